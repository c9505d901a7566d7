#!/usr/bin/env bash
# Runs every test: builds the binaries the integration tests start, then the workspace tests.
# Needs only a Rust toolchain (no system packages: the uffd bindings ship pre-generated).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) and rerun" >&2
    exit 1
fi
cargo build --workspace --bins
cargo test --workspace "$@"
