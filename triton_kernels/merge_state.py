"""Triton kernel of the pairwise ``merge_state`` op (its CUDA twin is ``csrc/merge_state.cu``).

Combines two attention states (o, lse) over disjoint KV sets exactly: lse = log(exp(lse_a) + exp(lse_b)),
o = o_a·exp(lse_a − lse) + o_b·exp(lse_b − lse), with the fold the stage-2 merge uses
(:func:`.softmax.fold_state`): a state with no KV (lse = -inf) contributes nothing (its o is not used), two
empty states give o = 0, lse = -inf, and a NaN in either state gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import next_pow2, run_kernel
from .configs import device_arch, tile_config
from .softmax import fold_state, head_block, load_state, softmax_state, store_merged

__all__ = ["merge_state"]


@triton.jit
def _merge_state_kernel(
    o_a_ptr, lse_a_ptr, o_b_ptr, lse_b_ptr, out_ptr, lse_out_ptr,
    num_heads,
    stride_a_n, stride_a_h, stride_lse_a_n,
    stride_b_n, stride_b_h, stride_lse_b_n,
    stride_out_n, stride_out_h, stride_lse_out_n,
    HEAD_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """One program per (row n, head block)."""
    n = tl.program_id(0).to(tl.int64)
    h, h_valid, d, mask = head_block(num_heads, HEAD_BLOCK, HEAD_DIM, HEAD_DIM_PAD)
    acc, l_i, m_i = softmax_state(HEAD_BLOCK, HEAD_DIM_PAD)
    o_a, lse_a = load_state(o_a_ptr, lse_a_ptr, n, stride_a_n, stride_a_h, stride_lse_a_n, h, h_valid, d, mask)
    acc, l_i, m_i = fold_state(acc, l_i, m_i, o_a, lse_a)
    o_b, lse_b = load_state(o_b_ptr, lse_b_ptr, n, stride_b_n, stride_b_h, stride_lse_b_n, h, h_valid, d, mask)
    acc, l_i, m_i = fold_state(acc, l_i, m_i, o_b, lse_b)
    store_merged(acc, l_i, m_i, out_ptr, lse_out_ptr, n, stride_out_n, stride_out_h, stride_lse_out_n, h, h_valid, d,
                 mask)


def merge_state(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
    out: torch.Tensor, lse_out: torch.Tensor,
) -> None:
    """out, lse_out = exact merge of (o_a, lse_a) and (o_b, lse_b); o: ``[n, H, D]``, lse: fp32 ``[n, H]``."""
    n, num_heads, head_dim = o_a.shape
    if n * num_heads == 0:
        return
    head_dim_pad = next_pow2(head_dim)
    config = tile_config("merge_state", device_arch(out.device), head_dim_pad, None, out.dtype, None)
    head_block = min(next_pow2(num_heads), config.block_n)
    run_kernel(
        _merge_state_kernel, (n, triton.cdiv(num_heads, head_block)),
        o_a, lse_a, o_b, lse_b, out, lse_out,
        num_heads,
        o_a.stride(0), o_a.stride(1), lse_a.stride(0),
        o_b.stride(0), o_b.stride(1), lse_b.stride(0),
        out.stride(0), out.stride(1), lse_out.stride(0),
        HEAD_BLOCK=head_block, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
