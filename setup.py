"""Build script for treeattn.

Python package (treeattn + treeattn.triton_kernels) plus, where possible, two compiled modules:
- ``treeattn._C``: the CUDA extension (ops registered with TORCH_LIBRARY under torch.ops.treeattn);
- ``treeattn._planner``: the C++ host planner (pybind11, CPU). Optional: when it cannot be built
  the install goes on without it and plan() uses the numpy planner.

TREEATTN_BUILD_CUDA selects the extension build:
  auto (default)  build it when torch is a CUDA build and a CUDA toolkit (nvcc) is found
  0               never build it (the Triton and reference paths still work)
  1               build it or fail
torch must be importable at build time for the extension, so install with
``pip install [-e] . --no-build-isolation`` (an isolated build has no torch: pure Python).
The toolkit root comes from CUDA_HOME / CUDA_PATH (when it is a toolkit), else from the nvcc on
PATH (following a symlink or a wrapper script that execs the real nvcc), else /usr/local/cuda[-*].
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_SOURCES = ["csrc/registration.cpp", "csrc/merge_state.cu", "csrc/kv_write.cu"]
# Hopper (H100/H200) only, with the arch-specific features (wgmma, TMA) of sm_90a.
NVCC_ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]


def _log(msg):
    print(f"treeattn setup: {msg}", file=sys.stderr)


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def _toolkit_from_nvcc(nvcc):
    """Toolkit root for an nvcc on PATH: a real binary, a symlink, or a wrapper script."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(root):
        return root
    try:  # a small shell wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(real, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if b"\0" in head:  # a binary that is not inside a toolkit
        return None
    for path in re.findall(r"([^\s'\"=:;]+)/bin/nvcc\b", head.decode("utf-8", "replace")):
        root = os.path.realpath(os.path.expandvars(path))
        if _is_toolkit(root):
            return root
    return None


def find_cuda_home():
    """Return (toolkit root or None, how it was found / why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val:
            if _is_toolkit(val):
                return val, f"${var}"
            # e.g. a root guessed from a wrapper nvcc: say so, and look further
            _log(f"ignoring ${var}={val}: no bin/nvcc and include/cuda_runtime.h there")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_from_nvcc(nvcc)
        if root:
            return root, f"nvcc on PATH ({nvcc})"
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_toolkit(root):
            return root, "default location"
    return None, "no CUDA toolkit found (set CUDA_HOME)"


def cuda_extension():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {})."""
    mode = os.environ.get("TREEATTN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"TREEATTN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _log("TREEATTN_BUILD_CUDA=0: pure-Python install, no CUDA extension")
        return [], {}

    reason = None
    cuda_home = None
    try:
        import torch
    except ImportError:
        reason = "torch is not importable at build time (install torch first and use --no-build-isolation)"
    else:
        if not torch.version.cuda:
            reason = f"torch {torch.__version__} is not a CUDA build"
        else:
            cuda_home, how = find_cuda_home()
            if cuda_home is None:
                reason = how
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"TREEATTN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _log(f"skipping the CUDA extension: {reason}")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME once, at import; set both the variable and the
    # module attribute so a wrong guess (e.g. /usr/local from a wrapper nvcc) cannot win.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    _log(f"building treeattn._C with CUDA toolkit {cuda_home} ({how}), torch {torch.__version__}")
    ext = cpp_extension.CUDAExtension(
        name="treeattn._C",
        sources=CUDA_SOURCES,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", *NVCC_ARCH_FLAGS],
        },
        # The library has no Python bindings (only an empty PyInit): it needs neither
        # libtorch_python nor a particular CPython ABI.
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def _pybind11_include():
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    try:  # torch ships the pybind11 headers
        import torch

        inc = os.path.join(os.path.dirname(torch.__file__), "include")
        return inc if os.path.isfile(os.path.join(inc, "pybind11", "pybind11.h")) else None
    except ImportError:
        return None


def planner_extension():
    """The C++ host planner treeattn._planner, or None without pybind11 headers."""
    from setuptools import Extension

    include = _pybind11_include()
    if include is None:
        _log("skipping treeattn._planner: no pybind11 headers (pip install pybind11)")
        return None
    return Extension(
        "treeattn._planner",
        sources=["csrc/planner.cpp"],
        include_dirs=[include],
        extra_compile_args=["-O3", "-std=c++17"],
        language="c++",
        optional=True,  # a failed build leaves the numpy planner, not a failed install
    )


ext_modules, cmdclass = cuda_extension()
planner = planner_extension()
if planner is not None:
    ext_modules.append(planner)

# python/treeattn -> treeattn, triton_kernels/ -> treeattn.triton_kernels
packages = {"treeattn", "treeattn.triton_kernels", *find_packages(where="python")}
packages.update("treeattn.triton_kernels." + p for p in find_packages(where="triton_kernels"))

setup(
    packages=sorted(packages),
    package_dir={"": "python", "treeattn.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
