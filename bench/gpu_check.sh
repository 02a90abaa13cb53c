#!/usr/bin/env bash
# One short run on the GPU machine (DESIGN §6): build the CUDA extension, run the tests on the GPU (the `gpu`
# tests included), run the benchmark suite, write everything into RESULTS_DIR.
#   bash bench/gpu_check.sh RESULTS_DIR
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh RESULTS_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1
python3 -c 'import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)' >> "$out/gpu.txt"
git rev-parse HEAD >> "$out/gpu.txt" 2>/dev/null
# setup.py finds the toolkit root itself (also behind a wrapper nvcc).
start=$(date +%s)
TREEATTN_BUILD_CUDA=1 MAX_JOBS=16 python3 -m pip install -e . --no-build-isolation --no-deps 2>&1 | tail -n 30 > "$out/build.log"
echo "build rc=${PIPESTATUS[0]} seconds=$(( $(date +%s) - start ))" | tee -a "$out/build.log"
python3 -c 'import treeattn._ext as e; print("HAS_CUDA_EXT", e.HAS_CUDA_EXT, getattr(e, "load_error", None))' 2>&1 | tee -a "$out/build.log"
# The `gpu` tests (bf16, CUDA ops, CUDA graphs); CI already runs the rest on CPU, and each distinct
# Triton config costs a compile here.
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests --junitxml="$out/tests.xml" 2>&1 | tail -n 40 | tee "$out/tests.log"
timeout 300 python3 bench/run_all.py --out "$out" 2>&1 | tee "$out/bench.log"
# Optional tile sweeps (a few more minutes): TREEATTN_SWEEP=1 bash bench/gpu_check.sh DIR
if [ "${TREEATTN_SWEEP:-0}" = 1 ]; then
  timeout 300 python3 bench/bench_tree_decode.py --sweep --out "$out/sweep" 2>&1 | tail -n 20 | tee "$out/sweep.log"
  timeout 300 python3 bench/bench_mla.py --sweep --out "$out/sweep" 2>&1 | tail -n 20 | tee -a "$out/sweep.log"
fi
