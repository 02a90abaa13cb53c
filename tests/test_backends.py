"""Which backend serves a device (``treeattn.backends``, ``treeattn.backend_for``), and what a CPU run without
the Triton interpreter does."""

import os
import subprocess
import sys

import pytest
import torch

import treeattn
from treeattn import _dispatch


def test_backends_say_what_serves_a_device_and_why_not():
    status = treeattn.backends("cpu")
    assert list(status) == ["cuda", "triton", "reference"]
    assert status["reference"] == "available"
    assert status["cuda"] == "cuda: the CUDA extension serves CUDA tensors, got device cpu"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted:
        assert status["triton"] == "available"
    else:
        assert status["triton"] == "triton: CPU needs TRITON_INTERPRET=1 set before triton is imported"
    expected = "triton" if interpreted else "reference"
    for op in ("tree_decode", "mla_tree_decode", "merge_state"):
        assert treeattn.backend_for(op, torch.device("cpu")) == expected
    with _dispatch.force("reference"):
        assert treeattn.backend_for("tree_decode", "cpu") == "reference"
    with pytest.raises(ValueError, match=r"op: expected one of \[.*'tree_decode'.*\], got 'attention'"):
        treeattn.backend_for("attention", "cpu")


_FALLBACK_SCRIPT = """
import warnings
import torch
import treeattn
from treeattn.testing import assert_close, tree_table

print(treeattn.backends("cpu")["triton"])
print(treeattn.backend_for("tree_decode", "cpu"))
table = tree_table([20, 5], [1, 2], 16)
plan = table.plan(device="cpu")
q, k = torch.randn(2, 4, 64), torch.randn(table.num_pages, 16, 2, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        o = treeattn.tree_decode(q, k, k, plan)
        treeattn.mla_tree_decode(q, k[:, :, 0], plan, sm_scale=0.1, v_head_dim=32)
        treeattn.merge_state(o, torch.zeros(2, 4), o, torch.zeros(2, 4))
assert_close(o, table.reference(q, k, k)[0])
print(True)
print(len(caught))
print(caught[0].message)
"""


def test_cpu_without_the_interpreter_runs_the_reference_and_says_so_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    lines = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[0] == "triton: CPU needs TRITON_INTERPRET=1 set before triton is imported"
    assert lines[1:4] == ["reference", "True", "1"]
    assert "runs the slow fp32 reference" in lines[4] and "TRITON_INTERPRET=1" in lines[4]
