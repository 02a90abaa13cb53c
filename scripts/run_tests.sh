#!/usr/bin/env bash
# The project's test command: TRITON_INTERPRET=1 python -m pytest -q -x tests [pytest args...]
# On a CPU-only machine the Triton kernels run in the interpreter (the variable must be set
# before triton is imported); tests marked `gpu` skip there.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
exec python -m pytest -q -x tests "$@"
