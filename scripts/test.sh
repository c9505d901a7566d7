#!/usr/bin/env bash
# Runs every test: builds the binaries the integration tests start, fuzzes the wire decoder
# and the VMM handshake parser briefly (FUZZ_SECONDS each, default 10), then runs the
# workspace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-deps.sh
cargo build --workspace --bins
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
cargo test --workspace "$@"
