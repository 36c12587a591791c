# Source this file (`. scripts/env.sh`) to get a shell, or a script, that can build fedtune.
#
# It installs, once, a Python virtual environment owned by the project with torch 2.11.0 from
# PyPI (the libtorch that tch 0.24 links), transformers and peft (for parity fixtures and the
# PyTorch side of the benchmarks), then exports what torch-sys needs to find that libtorch.
# Re-running it when everything is there takes well under a second.
#
# Why a venv outside the repo: torch with its CUDA libraries is several GB; keeping it in
# $FEDTUNE_HOME (default ~/.cache/fedtune) lets every clone and CI run on this machine share it,
# while `.venv` in the repo is only a link to it.

_fedtune_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FEDTUNE_HOME="${FEDTUNE_HOME:-$HOME/.cache/fedtune}"
# The pinned Python side. Change a pin here and the venv is rebuilt on the next run.
_fedtune_reqs="torch==2.11.0 transformers==5.23.0 safetensors==0.8.0 peft==0.21.2 numpy"
_fedtune_venv="$FEDTUNE_HOME/venv"
_fedtune_stamp="$_fedtune_venv/.fedtune-requirements"

if [ ! -x "$_fedtune_venv/bin/python" ] || [ "$(cat "$_fedtune_stamp" 2>/dev/null)" != "$_fedtune_reqs" ]; then
  echo "fedtune: installing the Python side ($_fedtune_reqs) into $_fedtune_venv" >&2
  mkdir -p "$FEDTUNE_HOME"
  python3 -m venv "$_fedtune_venv" || return 1 2>/dev/null || exit 1
  # shellcheck disable=SC2086
  "$_fedtune_venv/bin/pip" install --quiet --disable-pip-version-check $_fedtune_reqs \
    || { echo "fedtune: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
  "$_fedtune_venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))' \
    > "$_fedtune_venv/.fedtune-torch-dir" || { echo "fedtune: torch does not import" >&2; return 1 2>/dev/null || exit 1; }
  echo "$_fedtune_reqs" > "$_fedtune_stamp"
fi
if [ ! -s "$_fedtune_venv/.fedtune-torch-dir" ]; then
  "$_fedtune_venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))' > "$_fedtune_venv/.fedtune-torch-dir"
fi
# Asking Python where torch lives costs a second or two of CPU; it is recorded at install time.
_fedtune_torch="$(cat "$_fedtune_venv/.fedtune-torch-dir")"
ln -sfn "$_fedtune_venv" "$_fedtune_root/.venv"
ln -sfn "$_fedtune_torch" "$_fedtune_root/.libtorch"

# torch-sys asks `python` (inside a venv) for the libtorch location and C++ ABI.
export VIRTUAL_ENV="$_fedtune_venv"
export PATH="$_fedtune_venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# Python tools (parity fixtures, benchmarks) must never reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset _fedtune_reqs _fedtune_stamp _fedtune_torch
