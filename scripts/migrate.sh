#!/usr/bin/env bash
# The main job: a full loopback migration with sensible defaults (1 GiB image, two guest
# threads). Extra arguments go to `bench migrate` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) and rerun" >&2
    exit 1
fi
cargo build --release --workspace --bins
exec target/release/bench migrate "$@"
