#!/usr/bin/env bash
# The README's test command: installs everything a fresh machine lacks, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads=2
