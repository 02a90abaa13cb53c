"""Stage 2 of a tree decode step, shared by the GQA and MLA families: each query that more than one work item
read folds its partial states in the plan's root→leaf order (deterministic, no atomics). The merge depends
only on the partial states, not on how stage 1 computed them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, next_pow2
from .configs import device_arch, tile_config
from .softmax import fold_state, head_block, load_state, softmax_state, store_merged

__all__ = ["merge_partials", "merge_partials_launch"]


@triton.jit(do_not_specialize_on_alignment=("merge_query_ptr", "merge_ptr"))
def _merge_partials_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, merge_query_ptr, merge_ptr,
    stride_part_n, stride_part_h, stride_part_lse_n,
    stride_out_n, stride_out_h, stride_lse_n,
    num_heads,
    HEAD_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """One program per (merge query, head block): fold the query's partial rows in plan (root→leaf) order."""
    pid = tl.program_id(0)
    h, h_valid, d, mask = head_block(num_heads, HEAD_BLOCK, HEAD_DIM, HEAD_DIM_PAD)
    query = tl.load(merge_query_ptr + pid).to(tl.int64)
    if query < 0:  # padding entry of a fixed-capacity plan
        return
    begin = tl.load(merge_ptr + pid)
    end = tl.load(merge_ptr + pid + 1)
    acc, l_run, m_run = softmax_state(HEAD_BLOCK, HEAD_DIM_PAD)
    for i in range(0, end - begin):
        o_r, lse_r = load_state(part_o_ptr, part_lse_ptr, begin.to(tl.int64) + i, stride_part_n, stride_part_h,
                                stride_part_lse_n, h, h_valid, d, mask)
        acc, l_run, m_run = fold_state(acc, l_run, m_run, o_r, lse_r)
    store_merged(acc, l_run, m_run, out_ptr, lse_ptr, query, stride_out_n, stride_out_h, stride_lse_n, h, h_valid, d,
                 mask)


def merge_partials_launch(
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    merge_query: torch.Tensor,
    merge_ptr: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> Launch | None:
    """The stage-2 launch, for tensors shaped and strided like these; call it with
    ``(partial_o, partial_lse, out, lse)``. None when no query needs a merge.

    Stage 2: ``out[merge_query[i]]`` = merge of partial rows ``merge_ptr[i]:merge_ptr[i+1]``.
    partial_o: fp32 ``[P, H, D]``; partial_lse: fp32 ``[P, H]``; out: ``[n, H, D]``; lse: fp32 ``[n, H]``.
    """
    num_merge = merge_query.shape[0]
    if num_merge == 0:
        return None
    num_heads, head_dim = out.shape[1], out.shape[2]
    head_dim_pad = next_pow2(head_dim)
    config = tile_config("merge_partials", device_arch(out.device), head_dim_pad, None, out.dtype, None)
    head_block = min(next_pow2(num_heads), config.block_n)
    args = [
        partial_o, partial_lse, out, lse, merge_query, merge_ptr,
        partial_o.stride(0), partial_o.stride(1), partial_lse.stride(0),
        out.stride(0), out.stride(1), lse.stride(0),
        num_heads,
    ]
    return Launch(_merge_partials_kernel, (num_merge, triton.cdiv(num_heads, head_block)), args, (0, 1, 2, 3),
                  dict(HEAD_BLOCK=head_block, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                       num_warps=config.num_warps, num_stages=config.num_stages))


def merge_partials(partial_o, partial_lse, merge_query, merge_ptr, out, lse) -> None:
    """Stage 2 (arguments as in :func:`merge_partials_launch`)."""
    launch = merge_partials_launch(partial_o, partial_lse, merge_query, merge_ptr, out, lse)
    if launch is not None:
        launch(partial_o, partial_lse, out, lse)
