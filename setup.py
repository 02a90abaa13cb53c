"""Build script for treeattn.

Python package (treeattn + treeattn.triton_kernels) plus two compiled modules:
- ``treeattn._planner``: the C++ host planner (pybind11, CPU); always built (pybind11 is a build
  requirement; torch's bundled pybind11 headers serve too);
- ``treeattn._C``: the CUDA extension (ops registered with TORCH_LIBRARY under torch.ops.treeattn).

TREEATTN_BUILD_CUDA selects the CUDA extension build:
  auto (default)  build it when torch is a CUDA build and a CUDA toolkit (nvcc) is found
  0               never build it (the Triton and reference paths still work)
  1               build it or fail
torch must be importable at build time for the extension, so install with
``pip install [-e] . --no-build-isolation`` (an isolated build has no torch: no CUDA extension).
Sources, compile flags, target archs and toolkit discovery come from csrc/build_config.py (CMakeLists.txt and
scripts/sanitize_planner.sh read the same).
"""

import os
import sys

from setuptools import Extension, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_config  # noqa: E402  (csrc/build_config.py: sources, flags, archs, toolkit discovery)
import setuptools  # noqa: E402


def _log(msg):
    print(f"treeattn setup: {msg}", file=sys.stderr)


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
            cuda_home, how = build_config.find_cuda_home()
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
        sources=build_config.CUDA_SOURCES,
        extra_compile_args={
            "cxx": build_config.CUDA_CXX_FLAGS,
            "nvcc": [*build_config.NVCC_FLAGS, *build_config.nvcc_arch_flags()],
        },
        # Not py_limited_api: the wheel also holds treeattn._planner, a pybind11 module built for one CPython, so
        # an abi3 treeattn._C would make no wheel portable across Pythons.
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def planner_extension():
    """The C++ host planner treeattn._planner (required: it is the only planner)."""
    include = build_config.pybind11_include()
    if include is None:
        raise RuntimeError("treeattn._planner needs pybind11 headers: pip install pybind11 (or install torch first "
                           "and build with --no-build-isolation)")
    return Extension(
        "treeattn._planner",
        sources=build_config.PLANNER_SOURCES,
        include_dirs=[include],
        extra_compile_args=build_config.PLANNER_CXX_FLAGS,
        language="c++",
    )


def license_metadata():
    """Apache-2.0 as the SPDX expression (License-Expression) where setuptools reads one (>= 77), else as the
    plain license field: pyproject.toml cannot say both, and an older setuptools (as a ``--no-build-isolation``
    install may find) rejects the SPDX string there."""
    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "Apache-2.0", "license_files": ["LICENSE"]}
    return {"license": "Apache-2.0"}


ext_modules, cmdclass = cuda_extension()
ext_modules.append(planner_extension())

# python/treeattn -> treeattn, triton_kernels/ -> treeattn.triton_kernels
packages = {"treeattn", "treeattn.triton_kernels", *find_packages(where="python")}
packages.update("treeattn.triton_kernels." + p for p in find_packages(where="triton_kernels"))

setup(
    packages=sorted(packages),
    package_dir={"": "python", "treeattn.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
    **license_metadata(),
)
