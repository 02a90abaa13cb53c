"""Packaging: the dependency lists agree, the build's one list of sources and flags is complete, and the
constants the Python side shares with the C++ planner come from it. (The sdist -> wheel -> install flow itself
is scripts/check_sdist.sh, run by CI.)"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from treeattn import _planner
from treeattn.triton_kernels import configs

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _build_config():
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        import build_config

        return build_config
    finally:
        sys.path.pop(0)


def test_requirements_test_lists_the_test_bench_and_dev_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    wanted = set()
    for name in ("test", "bench", "dev"):
        for req in extras[name]:
            # A self-reference (treeattn[hf]) stands for that extra's requirements.
            self_ref = re.fullmatch(r"treeattn\[(\w+)\]", req)
            wanted.update(extras[self_ref.group(1)] if self_ref else [req])
    lines = (ROOT / "requirements-test.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert listed == wanted


def test_every_local_include_of_the_sources_is_a_listed_file():
    """setup.py, CMakeLists.txt and the sdist take csrc/ from build_config.py: a header that a source includes
    must exist under csrc/ (MANIFEST.in carries csrc/ whole)."""
    config = _build_config()
    sources = config.CUDA_SOURCES + config.PLANNER_SOURCES + config.PLANNER_HEADERS
    for source in sources:
        text = (ROOT / source).read_text()
        for header in re.findall(r'#include "([^"]+)"', text):
            assert (ROOT / "csrc" / header).is_file(), f"{source} includes {header}, which is not in csrc/"
    assert set(config.PLANNER_SOURCES) <= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")}


def test_build_config_prints_the_flags_every_build_takes():
    config = _build_config()
    cmake = subprocess.run([sys.executable, str(ROOT / "csrc" / "build_config.py"), "cmake"], check=True,
                           capture_output=True, text=True).stdout
    assert f"set(TREEATTN_PLANNER_CXX_FLAGS {' '.join(config.PLANNER_CXX_FLAGS)})" in cmake
    assert f"set(TREEATTN_NVCC_FLAGS {' '.join(config.NVCC_FLAGS)})" in cmake
    # The sanitizer build differs in optimisation and instrumentation only, not in the language dialect.
    assert set(config.PLANNER_STD_FLAGS) <= set(config.PLANNER_SANITIZE_FLAGS)
    assert set(config.PLANNER_STD_FLAGS) <= set(config.PLANNER_CXX_FLAGS)


def test_python_reads_the_planners_tile_rows_and_default_sm_count():
    assert configs.MAX_TILE_ROWS == _planner.SIZING["target_rows_per_item"]
    plan_module = importlib.import_module("treeattn.plan")  # (treeattn.plan is the function)
    assert plan_module._sm_count("cpu") == _planner.SIZING["default_num_sms"]


def test_version_comes_from_the_package_metadata():
    import importlib.metadata

    import treeattn

    try:
        importlib.metadata.version("treeattn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("treeattn is not installed (a source tree on sys.path has no metadata)")
    assert _pyproject()["project"]["version"] == importlib.metadata.version("treeattn") == treeattn.__version__
