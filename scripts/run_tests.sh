#!/usr/bin/env bash
# The project's test command (in an environment that has treeattn installed): python -m pytest -q tests
# tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no CUDA GPU, so the
# Triton kernels run in the CPU interpreter; tests marked `gpu` skip there and run on a GPU machine.
# The run ends with the skips counted by reason (the tests/skip_summary.py plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pytest -q -p skip_summary tests "$@"
