#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer via cargo fuzz, nightly toolchain) of the frame decoder
# and the VMM handshake parser. Usage: scripts/fuzz.sh [SECONDS per target, default 60]
# A crash fails the script and leaves the input under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "SKIPPED fuzzing: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
cd fuzz
for target in frame_decoder vmm_handshake; do
    echo "fuzzing $target for ${secs}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$secs" 2>&1 | tail -2
done
