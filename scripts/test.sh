#!/usr/bin/env bash
# Runs every test: checks the format and the lints (clippy with -D warnings: every unsafe
# block documented, the workspace lints in Cargo.toml), builds the binaries the integration
# tests start, fuzzes every parser of untrusted input briefly (FUZZ_SECONDS each, default
# 10), then runs the workspace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
cargo test --workspace "$@"
