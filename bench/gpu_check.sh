#!/usr/bin/env bash
# One short run on the GPU machine, at most ~8 minutes on an H200: build the CUDA extension, run the `gpu`
# tests, then the benchmark suite (bench/run_all.py), which on a GPU starts with the device side of the
# static sm_90a check (registers and spills of every kernel the ops compiled, as the driver reports them:
# static_device.json), times treeattn and its peers (bench/peers.py) on the same inputs, and writes JSON,
# summary.md and plots into RESULTS_DIR. FlashInfer's first use JIT-compiles its kernels (minutes): name fewer
# peers with TREEATTN_PEERS=a,b (or none) when the budget is short.
#   bash bench/gpu_check.sh RESULTS_DIR
# Each step gets what is left of the budget (TREEATTN_GPU_BUDGET_S, default 470 s) and a cap of its own;
# steps.txt records how long each took.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh RESULTS_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${TREEATTN_GPU_BUDGET_S:-470}))
# budget CAP: seconds this step may run (its cap, or what is left of the budget if less; at least 10)
budget() { local left=$((deadline - SECONDS)); [ "$left" -lt "$1" ] || left=$1; [ "$left" -gt 10 ] || left=10; echo "$left"; }
step_start=$SECONDS
done_step() { echo "$1 rc=$2 seconds=$((SECONDS - step_start))" | tee -a "$out/steps.txt"; step_start=$SECONDS; }

# FlashInfer, a peer of the suite, comes from a wheel folder brought along (the machine has no network):
# TREEATTN_FLASHINFER_WHEELS=DIR (docs/benchmarks.md says how to fill it). Without it the FlashInfer rows are
# recorded as skipped, and the other peers still run.
if [ -n "${TREEATTN_FLASHINFER_WHEELS:-}" ]; then
  # With its dependencies from the folder; else only FlashInfer and its compiled tvm-ffi (the rest may be here).
  timeout "$(budget 60)" python3 -m pip install --no-index --find-links "$TREEATTN_FLASHINFER_WHEELS" flashinfer-python \
    > "$out/flashinfer_install.log" 2>&1 \
    || timeout "$(budget 60)" python3 -m pip install --no-index --no-deps --find-links "$TREEATTN_FLASHINFER_WHEELS" \
      flashinfer-python apache-tvm-ffi >> "$out/flashinfer_install.log" 2>&1
  done_step flashinfer_install "$?"
  python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tail -n 1 | tee -a "$out/flashinfer_install.log"
else
  echo "FlashInfer: TREEATTN_FLASHINFER_WHEELS is not set, so FlashInfer is not installed and its peer rows are skipped" \
    "(docs/benchmarks.md: how to prepare the wheel folder)" | tee "$out/flashinfer_install.log"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1
python3 -c 'import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)' >> "$out/gpu.txt"
git rev-parse HEAD >> "$out/gpu.txt" 2>/dev/null
# setup.py finds the toolkit root itself (also behind a wrapper nvcc).
TREEATTN_BUILD_CUDA=1 MAX_JOBS=16 timeout "$(budget 200)" python3 -m pip install -e . --no-build-isolation --no-deps \
  2>&1 | tail -n 30 > "$out/build.log"
done_step build "${PIPESTATUS[0]}"
python3 -c 'import treeattn._ext as e; print("HAS_CUDA_EXT", e.HAS_CUDA_EXT, getattr(e, "load_error", None))' 2>&1 | tee -a "$out/build.log"
# The `gpu` tests (bf16, CUDA ops, CUDA graphs); CI already runs the rest on CPU, and each distinct
# Triton config costs a compile here.
timeout "$(budget 150)" python3 -m pytest -q -p no:cacheprovider -m gpu tests --junitxml="$out/tests.xml" 2>&1 \
  | tail -n 40 | tee "$out/tests.log"
done_step tests "${PIPESTATUS[0]}"
timeout "$(budget 400)" python3 bench/run_all.py --out "$out" 2>&1 | tee "$out/bench.log"
done_step suite "${PIPESTATUS[0]}"
# Optional tile sweeps, outside the budget (a few more minutes): TREEATTN_SWEEP=1 bash bench/gpu_check.sh DIR.
# Each prints its winner as a row of triton_kernels/configs.py's TABLE.
if [ "${TREEATTN_SWEEP:-0}" = 1 ]; then
  timeout 300 python3 bench/bench_tree_decode.py --sweep --out "$out/sweep" 2>&1 | tail -n 20 | tee "$out/sweep.log"
  timeout 300 python3 bench/bench_mla.py --sweep --out "$out/sweep" 2>&1 | tail -n 20 | tee -a "$out/sweep.log"
fi
