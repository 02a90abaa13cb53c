"""Triton attention-state merges: stage 2 of tree decode and the public pairwise ``merge_state``.

Both combine states (o, lse) over disjoint KV sets exactly: lse = log Σ exp(lse_i), o = Σ o_i exp(lse_i - lse).
The running maximum keeps every exponent ≤ 0; a state with no KV (lse = -inf) contributes nothing, and
only-empty inputs give o = 0, lse = -inf (never NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import next_pow2

__all__ = ["merge_partials", "merge_state"]


@triton.jit
def _merge_partials_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, merge_query_ptr, merge_ptr,
    stride_part_n, stride_part_h, stride_part_lse_n,
    stride_out_n, stride_out_h, stride_lse_n,
    num_heads,
    HEAD_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """One program per (merge query, head block): fold the query's partial rows in plan (root→leaf) order."""
    pid = tl.program_id(0)
    h = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    h_valid = h < num_heads
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = h_valid[:, None] & (d < HEAD_DIM)[None, :]
    query = tl.load(merge_query_ptr + pid).to(tl.int64)
    if query < 0:  # padding entry of a fixed-capacity plan
        return
    begin = tl.load(merge_ptr + pid)
    end = tl.load(merge_ptr + pid + 1)
    m_run = tl.full([HEAD_BLOCK], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([HEAD_BLOCK], dtype=tl.float32)
    acc = tl.zeros([HEAD_BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    for i in range(0, end - begin):
        r64 = begin.to(tl.int64) + i
        lse_r = tl.load(part_lse_ptr + r64 * stride_part_lse_n + h, mask=h_valid, other=float("-inf"))
        o_r = tl.load(part_o_ptr + r64 * stride_part_n + h[:, None] * stride_part_h + d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_run, lse_r)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        w = tl.exp(lse_r - m_safe)
        acc = acc * alpha[:, None] + o_r * w[:, None]
        l_run = l_run * alpha + w
        m_run = m_new
    has_kv = l_run > 0
    o = tl.where(has_kv[:, None], acc / tl.where(has_kv, l_run, 1.0)[:, None], 0.0)
    lse = tl.where(has_kv, m_run + tl.log(tl.where(has_kv, l_run, 1.0)), float("-inf"))
    tl.store(out_ptr + query * stride_out_n + h[:, None] * stride_out_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + query * stride_lse_n + h, lse, mask=h_valid)


def merge_partials(
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    merge_query: torch.Tensor,
    merge_ptr: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Stage 2: ``out[merge_query[i]]`` = merge of partial rows ``merge_ptr[i]:merge_ptr[i+1]``.

    partial_o: fp32 ``[P, H, D]``; partial_lse: fp32 ``[P, H]``; out: ``[n, H, D]``; lse: fp32 ``[n, H]``.
    """
    num_merge = merge_query.shape[0]
    if num_merge == 0:
        return
    num_heads, head_dim = out.shape[1], out.shape[2]
    head_block = min(next_pow2(num_heads), 4)
    _merge_partials_kernel[(num_merge, triton.cdiv(num_heads, head_block))](
        partial_o, partial_lse, out, lse, merge_query, merge_ptr,
        partial_o.stride(0), partial_o.stride(1), partial_lse.stride(0),
        out.stride(0), out.stride(1), lse.stride(0),
        num_heads,
        HEAD_BLOCK=head_block, HEAD_DIM=head_dim, HEAD_DIM_PAD=next_pow2(head_dim),
    )


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
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    o = (o_a * w_a + o_b * w_b) * inv
    lse = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
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
