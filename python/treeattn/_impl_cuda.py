"""CUDA backend: ops compiled into ``treeattn._C`` (registered with TORCH_LIBRARY in ``csrc/``)."""

from __future__ import annotations

import torch

from ._dispatch import register


@register("merge_state", "cuda")
def merge_state(o_a, lse_a, o_b, lse_b, out, lse_out):
    torch.ops.treeattn.merge_state_cuda(o_a, lse_a, o_b, lse_b, out, lse_out)


@register("kv_write", "cuda")
def kv_write(slots, k, v, pool, layer):
    torch.ops.treeattn.kv_write_cuda(slots, k, v, pool, layer)
