#!/usr/bin/env bash
# Runs every test: builds the binaries the integration tests start, then the workspace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
