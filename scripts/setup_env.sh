#!/usr/bin/env bash
# Set-up for a fresh machine (used by .ci/run, scripts/test.sh and scripts/bench.sh): a venv with
# torch, triton, numpy, the build and test tools, and treeattn installed into it with its CUDA extension
# (and the C++ planner). Source it: it leaves the venv first on PATH.
#   TREEATTN_FRESH_VENV=1   recreate the venv (CI); otherwise an existing one is reused
#   TREEATTN_BUILD_CUDA     auto (default here: build the CUDA extension when a toolkit exists) | 0 | 1
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${TREEATTN_CI_VENV:-$ROOT/.venv}
TORCH_SPEC=${TREEATTN_CI_TORCH:-torch==2.14.1}

step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS"; }
# Runs a long, quiet command with a line every 20 s so that a fresh set-up is never minutes of silence.
with_progress() {
  local what=$1 start=$SECONDS next=$((SECONDS + 20)) pid; shift
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS >= next )) && kill -0 "$pid" 2>/dev/null; then
      echo "    ... $what ($((SECONDS - start)) s)"
      next=$((SECONDS + 20))
    fi
  done
  wait "$pid"
}

if [ "${TREEATTN_FRESH_VENV:-0}" = 1 ] || [ ! -x "$VENV/bin/python" ]; then
  step "fresh venv at $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python --version

step "install $TORCH_SPEC, triton, numpy, build and test dependencies"
with_progress "installing torch (a CUDA build: several GB)" python -m pip install -q "$TORCH_SPEC" triton numpy
with_progress "installing the build and test tools" python -m pip install -q "setuptools>=64" wheel ninja pybind11 -r requirements-test.txt
python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)'

# The CUDA toolkit root, found as setup.py finds it (csrc/build_config.py: also behind a wrapper nvcc).
find_cuda_home() { python csrc/build_config.py cuda-home; }
export TREEATTN_BUILD_CUDA=${TREEATTN_BUILD_CUDA:-auto}
if CUDA_HOME=$(find_cuda_home); then
  export CUDA_HOME
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2
elif [ "$TREEATTN_BUILD_CUDA" = 1 ]; then
  echo "no CUDA toolkit found (nvcc + include/cuda_runtime.h)" >&2
  exit 1
else
  unset CUDA_HOME
  echo "no CUDA toolkit: installing without the CUDA extension (Triton + reference paths)"
fi

step "build and install treeattn (TREEATTN_BUILD_CUDA=$TREEATTN_BUILD_CUDA, CUDA_HOME=${CUDA_HOME:-none})"
build_start=$SECONDS
MAX_JOBS=${MAX_JOBS:-2} with_progress "compiling treeattn" python -m pip install -q --no-build-isolation "$ROOT"
echo "build + install took $((SECONDS - build_start)) s"

