#!/usr/bin/env bash
# The main job: a complete loopback live migration of a running 1 GiB KVM guest.
# Extra arguments go to `bench migrate` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-deps.sh
cargo build --release --workspace --bins
exec target/release/bench migrate "$@"
