#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer via cargo fuzz, nightly toolchain) of every parser of
# untrusted input: the frame decoder, the sealed frame reader, the VMM handshake, the source
# VMM link, working-set files, control commands, free-page bitmaps, and the object store's
# formats (manifests, pack indexes, frames).
# Usage: scripts/fuzz.sh [SECONDS per target, default 60]
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
for target in frame_decoder sealed_reader vmm_handshake source_link working_set control_command free_hints \
    store_manifest store_pack_index store_frame; do
    echo "fuzzing $target for ${secs}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$secs" 2>&1 | tail -2
done
