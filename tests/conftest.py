"""Test setup: Triton runs under its CPU interpreter when no GPU is present (TRITON_INTERPRET must be set
before triton is imported, so it happens here, before any test module imports treeattn), and the one
vocabulary of skip markers (registered in pyproject.toml, applied in pytest_collection_modifyitems):

- ``gpu``: needs a CUDA GPU;
- ``cuda_ext``: needs the CUDA extension ``treeattn._C`` (its schemas and fake kernels load without a GPU);
- ``nvcc``: needs a CUDA toolkit (``nvcc`` on PATH);
- ``interpreter``: needs Triton's CPU interpreter to serve CPU tensors.

A test carries every marker it needs (a test of a CUDA op on a GPU: ``gpu`` and ``cuda_ext``), on the test
or on one ``pytest.param``; tests do not skip themselves.
"""

import os
import shutil

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import treeattn  # noqa: E402
from treeattn import _ext  # noqa: E402
from treeattn.testing import TOLERANCE  # noqa: E402,F401  (re-exported for the tests that import it from here)


def _missing() -> dict[str, str | None]:
    """Each marker mapped to why its tests cannot run here (None when they can)."""
    return {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA GPU",
        "cuda_ext": None if _ext.HAS_CUDA_EXT else f"needs the CUDA extension ({_ext.load_error})",
        "nvcc": None if shutil.which("nvcc") else "needs a CUDA toolkit (nvcc on PATH)",
        "interpreter": None if treeattn.backend_for("tree_decode", "cpu") == "triton"
        else "needs Triton's CPU interpreter (TRITON_INTERPRET=1 before triton is imported)",
    }


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    missing = {name: reason for name, reason in _missing().items() if reason}
    for item in items:
        reasons = [missing[name] for name in missing if item.get_closest_marker(name)]
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))
