#!/usr/bin/env bash
# The host planner under AddressSanitizer + UndefinedBehaviorSanitizer: builds treeattn._planner with
# -fsanitize=address,undefined (any finding aborts; flags from csrc/build_config.py), runs the core's own C++
# test (tests/cpp/test_planner_core.cpp, no Python), puts the module into a copy of the package and runs the
# planner tests (oracle, regression and fuzz tests; the fuzz sandboxes load the same build) against it.
#   bash scripts/sanitize_planner.sh [extra pytest args]      (in an environment with treeattn's deps)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CXX=${CXX:-g++}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A copy of the package laid out as installed (treeattn, treeattn.triton_kernels), with the sanitized planner.
cp -r python/treeattn "$work/treeattn"
rm -rf "$work/treeattn/triton_kernels"  # (a development checkout may link it there)
cp -r triton_kernels "$work/treeattn/triton_kernels"
rm -f "$work"/treeattn/_planner*.so "$work"/treeattn/_C*.so
suffix=$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
start=$SECONDS
# Flags, includes and sources from csrc/build_config.py, as every build of the planner takes them.
# shellcheck disable=SC2046  # (word splitting of the flag lists is wanted)
"$CXX" $(python csrc/build_config.py planner-sanitize-flags) -shared -fPIC \
  $(python csrc/build_config.py planner-includes) $(python csrc/build_config.py planner-sources) \
  -o "$work/treeattn/_planner$suffix"
echo "sanitized planner built in $((SECONDS - start)) s"
# The core without Python: its own test program, same flags.
# shellcheck disable=SC2046
"$CXX" $(python csrc/build_config.py planner-sanitize-flags) -Icsrc $(python csrc/build_config.py planner-core-sources) \
  tests/cpp/test_planner_core.cpp -o "$work/test_planner_core"
ASAN_OPTIONS=abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "$work/test_planner_core"

export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
# libasan first; libstdc++ with it, so that ASan's __cxa_throw interceptor finds the real one (python itself
# does not link libstdc++; C++ extensions that throw while importing would trip a CHECK otherwise).
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
# Python itself leaks by design at exit; aborting on the first finding makes it a test failure.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$work"  # (not the repository root: the tests must import the copy)
python -c 'import treeattn._planner as p, sys; assert p.__file__.startswith(sys.argv[1]), p.__file__; print("planner:", p.__file__)' "$work"
start=$SECONDS
python -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  "$ROOT/tests/test_plan.py" "$ROOT/tests/test_plan_hardening.py" "$ROOT/tests/test_planner_fuzz.py" "$@"
echo "planner tests under ASan/UBSan took $((SECONDS - start)) s"
