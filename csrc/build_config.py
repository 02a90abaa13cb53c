"""What treeattn's compiled modules are built from, and where the CUDA toolkit is: the one definition that
setup.py imports, CMakeLists.txt reads (``python csrc/build_config.py cmake``) and scripts call.

    python csrc/build_config.py cuda-home                # the toolkit root (exit 1 and the reason on stderr if none)
    python csrc/build_config.py cmake                    # set(...) lines for CMakeLists.txt
    python csrc/build_config.py planner-sources          # sources of treeattn._planner
    python csrc/build_config.py planner-core-sources     # the planner core's alone (no pybind11)
    python csrc/build_config.py planner-sanitize-flags   # compile flags of its ASan/UBSan build
    python csrc/build_config.py planner-includes         # -I flags for treeattn._planner (pybind11, Python)

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import sysconfig

# treeattn._C: the CUDA ops (TORCH_LIBRARY registrations and kernels). Its C++ dialect is the one torch's headers
# need: torch's BuildExtension passes it to setup.py's build, CMakeLists.txt sets it (C++20).
CUDA_SOURCES = ["csrc/registration.cpp", "csrc/merge_state.cu", "csrc/kv_write.cu"]
CUDA_CXX_FLAGS = ["-O3"]
# nvcc: besides -O3, the flags torch's BuildExtension adds to every .cu (no implicit half / bfloat16 operators and
# conversions, constexpr host functions in device code), so that the CMake build compiles the same code.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# Hopper (H100/H200) only, with the arch-specific features (wgmma, TMA) of sm_90a.
CUDA_ARCHS = ["90a"]
# treeattn._planner: the host planner, a plain C++ core (planner.h, planner.cpp) and its pybind11 binding.
PLANNER_CORE_SOURCES = ["csrc/planner.cpp"]  # (no Python: tests/cpp/test_planner_core.cpp links these alone)
PLANNER_SOURCES = [*PLANNER_CORE_SOURCES, "csrc/planner_bindings.cpp"]
PLANNER_HEADERS = ["csrc/planner.h"]
PLANNER_STD_FLAGS = ["-std=c++17"]
PLANNER_CXX_FLAGS = [*PLANNER_STD_FLAGS, "-O3"]
# The sanitizer build of the planner (scripts/sanitize_planner.sh): the same dialect, no optimisation, and any
# AddressSanitizer / UndefinedBehaviorSanitizer finding aborts.
PLANNER_SANITIZE_FLAGS = [*PLANNER_STD_FLAGS, "-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                          "-fno-sanitize-recover=all"]


def nvcc_arch_flags() -> list[str]:
    """``-gencode`` flags for :data:`CUDA_ARCHS` (SASS for each, as nvcc spells it)."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in CUDA_ARCHS]


def torch_cuda_arch_list() -> str:
    """:data:`CUDA_ARCHS` as torch's ``TORCH_CUDA_ARCH_LIST`` spells it (``90a`` -> ``9.0a``)."""
    return ";".join(re.sub(r"^(\d+)(\d)(a?)$", r"\1.\2\3", arch) for arch in CUDA_ARCHS)


def pybind11_include() -> str | None:
    """pybind11's headers: the pybind11 package's, else the copy torch ships; None without either."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    return include if os.path.isfile(os.path.join(include, "pybind11", "pybind11.h")) else None


def _log(msg: str) -> None:
    print(f"treeattn build: {msg}", file=sys.stderr)


def is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def _toolkit_from_nvcc(nvcc: str) -> str | None:
    """Toolkit root for an nvcc on PATH: a real binary, a symlink, or a wrapper script (such as
    ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``, from which torch would guess the root /usr/local)."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if is_toolkit(root):
        return root
    try:
        with open(real, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if b"\0" in head:  # a binary that is not inside a toolkit
        return None
    for path in re.findall(r"([^\s'\"=:;]+)/bin/nvcc\b", head.decode("utf-8", "replace")):
        root = os.path.realpath(os.path.expandvars(path))
        if is_toolkit(root):
            return root
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root or None, how it was found / why not): $CUDA_HOME or $CUDA_PATH when it is a toolkit,
    else the nvcc on PATH (through a symlink or a wrapper script), else /usr/local/cuda[-*]."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val:
            if is_toolkit(val):
                return val, f"${var}"
            _log(f"ignoring ${var}={val}: no bin/nvcc and include/cuda_runtime.h there")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_from_nvcc(nvcc)
        if root:
            return root, f"nvcc on PATH ({nvcc})"
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if is_toolkit(root):
            return root, "default location"
    return None, "no CUDA toolkit found (nvcc + include/cuda_runtime.h; set CUDA_HOME)"


def _cmake_list(name: str, values: list[str]) -> str:
    return f'set({name} {" ".join(values)})'


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "cuda-home":
        root, how = find_cuda_home()
        if root is None:
            print(how, file=sys.stderr)
            return 1
        print(root)
    elif command == "cmake":
        print(_cmake_list("TREEATTN_CUDA_SOURCES", CUDA_SOURCES))
        print(_cmake_list("TREEATTN_PLANNER_SOURCES", PLANNER_SOURCES))
        print(_cmake_list("TREEATTN_CUDA_CXX_FLAGS", CUDA_CXX_FLAGS))
        print(_cmake_list("TREEATTN_NVCC_FLAGS", NVCC_FLAGS))
        print(_cmake_list("TREEATTN_PLANNER_CXX_FLAGS", PLANNER_CXX_FLAGS))
        print(f'set(TREEATTN_TORCH_CUDA_ARCH_LIST "{torch_cuda_arch_list()}")')
        print(f'set(TREEATTN_PYBIND11_INCLUDE "{pybind11_include() or ""}")')
    elif command == "planner-sources":
        print(" ".join(PLANNER_SOURCES))
    elif command == "planner-core-sources":
        print(" ".join(PLANNER_CORE_SOURCES))
    elif command == "planner-sanitize-flags":
        print(" ".join(PLANNER_SANITIZE_FLAGS))
    elif command == "planner-includes":
        include = pybind11_include()
        if include is None:
            print("no pybind11 headers (pip install pybind11)", file=sys.stderr)
            return 1
        print(f"-I{include} -I{sysconfig.get_paths()['include']}")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
