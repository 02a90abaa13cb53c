"""Triton GQA tree decode: stage 1 (one program per work item, KV head and query block) and the launcher
:func:`tree_decode` that runs it with the stage-2 merge (:mod:`.merge_partials`).

Stage 1 stacks the item's queries x GQA group heads into the M dimension of one tensor-core tile, so every
K/V tile of the item's page chunk is loaded once for all of them; the walk, the online softmax and the
epilogue are the ones every stage-1 kernel shares (:mod:`.stage1`, :mod:`.softmax`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import LOG2E, Launch, dot_precision
from .configs import Stage1Tile, device_arch, stage1_tile, tile_config
from .fp8 import load_scale, scale_operand
from .softmax import online_softmax_tile, softmax_state, static_assert_dot_size
from .stage1 import (
    PLAN_POINTERS,
    columns,
    kv_tokens,
    load_tile,
    output_strides,
    plan_arrays,
    step_runner,
    store_state,
    tile_rows,
    work_item,
)

# stage1_tile / Stage1Tile live in the tile table's module; named here for the tile sweeps that import them.
__all__ = [
    "Stage1Tile", "prepare_tree_decode", "stage1_tile", "tree_decode", "tree_decode_stage1_launch",
]


@triton.jit(do_not_specialize_on_alignment=PLAN_POINTERS)
def _tree_decode_stage1_kernel(
    q_ptr, k_ptr, v_ptr,
    out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    kv_indices_ptr, item_page_ptr, item_num_tokens_ptr, item_row_ptr, row_query_ptr, row_dest_ptr,
    sm_scale_log2, k_scale_ptr, stride_k_scale, v_scale_ptr, stride_v_scale, out_scale,
    stride_q_n, stride_q_h,
    stride_k_page, stride_k_slot, stride_k_head,
    stride_v_page, stride_v_slot, stride_v_head,
    stride_out_n, stride_out_h,
    stride_lse_n,
    stride_part_n, stride_part_h,
    stride_part_lse_n,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr,
):
    static_assert_dot_size(BLOCK_Q * GROUP_PAD)
    static_assert_dot_size(HEAD_DIM_PAD)
    static_assert_dot_size(BLOCK_N)
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    row_begin, num_rows, first_page, num_tokens = work_item(item, item_row_ptr, item_page_ptr, item_num_tokens_ptr)
    # A padding item of a fixed-capacity plan, or a query block past the item's queries: nothing to do.
    if q_block * BLOCK_Q >= num_rows:
        return
    # Rows: (query, head of this KV head's group); a padded group's extra heads are masked rows.
    local_query, group_head, query_valid, query = tile_rows(q_block, row_begin, num_rows, row_query_ptr,
                                                            BLOCK_Q, GROUP_PAD)
    row_valid = query_valid & (group_head < GROUP)
    head = kv_head * GROUP + group_head
    d, d_valid = columns(0, HEAD_DIM_PAD, HEAD_DIM, HEAD_DIM_PAD)
    q = load_tile(q_ptr + query * stride_q_n + head * stride_q_h, row_valid, d, d_valid)
    # FP8 caches: K's scale folds into the softmax scale, V's into the output (one KV head per program, so a
    # per-head scale is one value here); tiles are converted to q's dtype in registers right after the load.
    qk_scale = sm_scale_log2
    if HAS_K_SCALE:
        qk_scale = qk_scale * load_scale(k_scale_ptr, kv_head * stride_k_scale)
    if HAS_V_SCALE:
        out_scale = out_scale * load_scale(v_scale_ptr, kv_head * stride_v_scale)
    acc, l_i, m_i = softmax_state(BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD)
    k_head = kv_head * stride_k_head
    v_head = kv_head * stride_v_head

    for start in range(0, num_tokens, BLOCK_N):
        t_valid, page, slot = kv_tokens(kv_indices_ptr, first_page, start, num_tokens, PAGE_SIZE, BLOCK_N)
        k = load_tile(k_ptr + page * stride_k_page + (slot * stride_k_slot + k_head), t_valid, d, d_valid).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        v = load_tile(v_ptr + page * stride_v_page + (slot * stride_v_slot + v_head), t_valid, d, d_valid).to(q.dtype)
        acc, l_i, m_i = online_softmax_tile(acc, l_i, m_i, qk * qk_scale, t_valid, v, DOT_PRECISION)

    store_state(
        acc, l_i, m_i, out_scale, query, head, row_valid, True, d, d_valid,
        row_dest_ptr, row_begin, local_query, query_valid,
        out_ptr, stride_out_n, stride_out_h, lse_ptr, stride_lse_n,
        part_o_ptr, stride_part_n, stride_part_h, part_lse_ptr, stride_part_lse_n,
    )


def tree_decode_stage1_launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan,
    out: torch.Tensor, lse: torch.Tensor, partial_o: torch.Tensor, partial_lse: torch.Tensor, sm_scale: float, *,
    k_scale: torch.Tensor | float | None = None, v_scale: torch.Tensor | float | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> Launch | None:
    """The stage-1 launch over every work item, for tensors shaped and strided like these; call it with
    ``(q, k_cache, v_cache, out, lse, *tensor_scales(k_scale, v_scale))`` (:func:`.stage1.tensor_scales`). None
    when the plan (a ``treeattn.TreePlan``: its device arrays and ``max_queries_per_item``) has no work item.

    q: ``[n, Hq, D]``; k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; out: ``[n, Hq, D]``;
    lse: fp32 ``[n, Hq]``; partial_o: fp32 ``[P, Hq, D]``; partial_lse: fp32 ``[P, Hq]``.
    The caches may be FP8 (``float8_e4m3fn`` / ``float8_e5m2``) with ``k_scale`` / ``v_scale``: true K is
    ``k_cache * k_scale`` (a float, or an fp32 tensor ``[]`` / ``[1]`` / ``[Hkv]``). ``block_n`` (KV tokens per
    tile, a power of two >= 16), ``num_warps`` and ``num_stages`` override the tile table (:mod:`.configs`)
    for tile sweeps.
    """
    num_items = plan.item_page_ptr.shape[0]
    if num_items == 0:
        return None
    max_queries_per_item = plan.max_queries_per_item
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_qo_heads // num_kv_heads
    tile = stage1_tile(group, head_dim, max_queries_per_item)
    config = tile_config("gqa_decode", device_arch(q.device), tile.head_dim_pad, tile.group_pad, q.dtype, tile.rows)
    # A float (or no) scale is folded into the float arguments; its pointer is any tensor the launch keeps.
    k_scale_ptr, stride_k_scale, k_factor, has_k_scale = scale_operand(k_scale, partial_lse)
    v_scale_ptr, stride_v_scale, v_factor, has_v_scale = scale_operand(v_scale, partial_lse)
    args = [
        q, k_cache, v_cache, out, lse, partial_o, partial_lse,
        *plan_arrays(plan),
        sm_scale * LOG2E * k_factor,
    ]
    k_scale_slot = len(args)
    args += [k_scale_ptr, stride_k_scale]
    v_scale_slot = len(args)
    args += [
        v_scale_ptr, stride_v_scale, v_factor,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *output_strides(out, lse, partial_o, partial_lse),
    ]
    slots = (0, 1, 2, 3, 4) + ((k_scale_slot,) if has_k_scale else ()) + ((v_scale_slot,) if has_v_scale else ())
    return Launch(_tree_decode_stage1_kernel, (num_items, num_kv_heads, tile.num_q_blocks), args, slots, dict(
        GROUP=group, GROUP_PAD=tile.group_pad, BLOCK_Q=tile.block_q,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=tile.head_dim_pad,
        PAGE_SIZE=page_size, BLOCK_N=block_n or config.block_n, DOT_PRECISION=dot_precision(q.dtype),
        HAS_K_SCALE=has_k_scale, HAS_V_SCALE=has_v_scale,
        num_warps=num_warps or config.num_warps, num_stages=num_stages or config.num_stages,
    ))


def prepare_tree_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan,
    out: torch.Tensor, lse: torch.Tensor, partial_o: torch.Tensor, partial_lse: torch.Tensor, sm_scale: float,
    k_scale: torch.Tensor | float | None = None, v_scale: torch.Tensor | float | None = None, **stage1_options,
):
    """A decode step's launches (stage 1 over the plan's work items, then stage 2 over its merge queries),
    prepared once for tensors shaped and strided like these and for these scales: returns
    ``run(q, k_cache, v_cache, out, lse, k_scale, v_scale)``, which a later layer calls with its own tensors
    (the same layout) and scale tensors (float scales are fixed here).

    ``plan``: a ``treeattn.TreePlan`` (or anything with its device tensors and ``max_queries_per_item``);
    the partial-state workspace is the plan's, fixed per step. ``stage1_options`` are stage 1's tuning knobs.
    """
    stage1 = tree_decode_stage1_launch(
        q, k_cache, v_cache, plan, out, lse, partial_o, partial_lse, sm_scale, k_scale=k_scale, v_scale=v_scale,
        **stage1_options,
    )
    steps = step_runner(stage1, plan, out, lse, partial_o, partial_lse, (k_scale, v_scale))

    def run(q, k_cache, v_cache, out, lse, k_scale=None, v_scale=None) -> None:
        steps(q, k_cache, v_cache, out, lse, scales=(k_scale, v_scale))

    return run


def tree_decode(q, k_cache, v_cache, plan, out, lse, partial_o, partial_lse, sm_scale, k_scale=None, v_scale=None,
                **stage1_options) -> None:
    """Run a decode step (arguments as in :func:`prepare_tree_decode`)."""
    run = prepare_tree_decode(
        q, k_cache, v_cache, plan, out, lse, partial_o, partial_lse, sm_scale, k_scale, v_scale, **stage1_options
    )
    run(q, k_cache, v_cache, out, lse, k_scale, v_scale)
