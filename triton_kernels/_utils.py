"""Small host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must stay fp32 through tl.dot (the fp32 oracle tolerance is 1e-5; TF32 is ~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"
