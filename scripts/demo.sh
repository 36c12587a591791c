#!/usr/bin/env bash
# The README's main job: a local simulated federation (real coordinator and client processes
# over gRPC on loopback) fine-tuning all-MiniLM-L6-v2 on Rotten Tomatoes snippets.
# Installs what a fresh machine lacks (venv with torch, the model and data), builds release
# binaries, then runs `fedtune-coordinator simulate`. Extra arguments are passed to simulate.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
cargo build --release --locked -p fedtune-coordinator -p fedtune-client
assets="$FEDTUNE_HOME/assets"
exec target/release/fedtune-coordinator simulate \
  --model "$assets/all-MiniLM-L6-v2" \
  --data "$assets/rt-snippets.csv" \
  --clients 3 --rounds 5 --partition iid \
  --out out/demo "$@"
