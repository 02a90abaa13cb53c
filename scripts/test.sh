#!/usr/bin/env bash
# Tests on a fresh machine: set up .venv (scripts/setup_env.sh), then the test suite
# (scripts/run_tests.sh: CPU -> Triton interpreter, `gpu` tests skip). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
bash scripts/run_tests.sh "$@"
