#!/usr/bin/env bash
# Main job on a fresh machine: set up .venv (scripts/setup_env.sh), then the benchmark suite
# (bench/run_all.py): kernel timings on a GPU; on CPU, plans, planner host time and bytes per method.
#   bash scripts/bench.sh [RESULTS_DIR]      (default bench/results/local/<date>_<host>, ignored by git;
#   copy a run worth keeping to bench/results/<date>_<host>/ and commit it: docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
out=${1:-bench/results/local/$(date +%Y-%m-%d)_$(hostname -s)}
python bench/run_all.py --out "$out"
