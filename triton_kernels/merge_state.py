"""Triton kernel of the pairwise ``merge_state`` op (its CUDA twin is ``csrc/merge_state.cu``).

Combines two attention states (o, lse) over disjoint KV sets exactly: lse = log(exp(lse_a) + exp(lse_b)),
o = o_a·exp(lse_a − lse) + o_b·exp(lse_b − lse). The maximum keeps every exponent ≤ 0; a state with no KV
(lse = -inf) contributes nothing (its o is not used), two empty states give o = 0, lse = -inf, and a NaN in
either state gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import next_pow2

__all__ = ["merge_state"]


@triton.jit
def _merge_state_kernel(
    o_a_ptr, lse_a_ptr, o_b_ptr, lse_b_ptr, out_ptr, lse_out_ptr,
    num_heads,
    stride_a_n, stride_a_h, stride_lse_a_n,
    stride_b_n, stride_b_h, stride_lse_b_n,
    stride_out_n, stride_out_h, stride_lse_out_n,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """One program per (n, h) row."""
    row = tl.program_id(0)
    n = (row // num_heads).to(tl.int64)
    h = row % num_heads
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = d < HEAD_DIM
    lse_a = tl.load(lse_a_ptr + n * stride_lse_a_n + h)
    lse_b = tl.load(lse_b_ptr + n * stride_lse_b_n + h)
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_safe)
    w_b = tl.exp(lse_b - m_safe)
    total = w_a + w_b
    o_a = tl.load(o_a_ptr + n * stride_a_n + h * stride_a_h + d, mask=mask, other=0.0).to(tl.float32)
    o_b = tl.load(o_b_ptr + n * stride_b_n + h * stride_b_h + d, mask=mask, other=0.0).to(tl.float32)
    # total is 0 only when both states are empty; a NaN lse makes it NaN, which must reach the output
    # (a NaN compares False to everything, so test for emptiness, not for "total > 0").
    nonempty = total != 0
    inv = tl.where(nonempty, 1.0 / tl.where(nonempty, total, 1.0), 0.0)
    # A state with zero weight (no KV) contributes nothing, whatever its o holds (as in the CUDA kernel).
    o = (tl.where(w_a == 0, 0.0, o_a * w_a) + tl.where(w_b == 0, 0.0, o_b * w_b)) * inv
    lse = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    tl.store(out_ptr + n * stride_out_n + h * stride_out_h + d, o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_out_ptr + n * stride_lse_out_n + h, lse)


def merge_state(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
    out: torch.Tensor, lse_out: torch.Tensor,
) -> None:
    """out, lse_out = exact merge of (o_a, lse_a) and (o_b, lse_b); o: ``[n, H, D]``, lse: fp32 ``[n, H]``."""
    n, num_heads, head_dim = o_a.shape
    if n * num_heads == 0:
        return
    _merge_state_kernel[(n * num_heads,)](
        o_a, lse_a, o_b, lse_b, out, lse_out,
        num_heads,
        o_a.stride(0), o_a.stride(1), lse_a.stride(0),
        o_b.stride(0), o_b.stride(1), lse_b.stride(0),
        out.stride(0), out.stride(1), lse_out.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=next_pow2(head_dim),
    )
