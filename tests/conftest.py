"""Test setup: Triton runs under its CPU interpreter when no GPU is present. TRITON_INTERPRET must be set
before triton is imported, so it happens here, before any test module imports treeattn."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from treeattn.testing import TOLERANCE  # noqa: E402,F401  (re-exported for the tests that import it from here)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
