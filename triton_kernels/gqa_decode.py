"""Triton GQA tree decode: stage 1 (one program per work item and KV head), the stage-2 merge of partial
states, and the launcher :func:`tree_decode` that runs both for a plan.

Stage 1 stacks the item's queries x GQA group heads into the M dimension of one tensor-core tile, so every
K/V tile of the item's page chunk is loaded once for all of them. Online softmax in the exp2 domain; the
result goes straight to the output when the query has no other item, else to an fp32 partial state.
Stage 2 (:func:`merge_partials`, also used by the MLA launcher) folds each such query's partial states in
the plan's root→leaf order: deterministic, no atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import LOG2E, Launch, dot_precision, next_pow2
from .configs import MAX_TILE_ROWS, device_arch, tile_config
from .fp8 import load_scale, scale_operand

__all__ = [
    "Stage1Tile", "merge_partials", "merge_partials_launch", "prepare_tree_decode", "stage1_tile", "tree_decode", "tree_decode_stage1",
    "tree_decode_stage1_launch", "step_runner", "tensor_scales",
]


# The plan's index arrays are views into one packed buffer, at offsets that move with the plan's sizes: not
# specialising on their alignment keeps a new plan from compiling a new kernel (their loads gain nothing).
_PLAN_POINTERS = ("kv_indices_ptr", "item_page_ptr", "item_num_tokens_ptr", "item_row_ptr", "row_query_ptr", "row_dest_ptr")


@triton.jit(do_not_specialize_on_alignment=_PLAN_POINTERS)
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
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    row_begin = tl.load(item_row_ptr + item)
    num_rows = tl.load(item_row_ptr + item + 1) - row_begin
    # A padding item of a fixed-capacity plan, or a query block past the item's queries: nothing to do.
    if q_block * BLOCK_Q >= num_rows:
        return
    first_page = tl.load(item_page_ptr + item)
    num_tokens = tl.load(item_num_tokens_ptr + item)

    # Row m of the tile is (query m // GROUP_PAD of this query block, head m % GROUP_PAD of this KV head's group).
    m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    local_query = q_block * BLOCK_Q + m // GROUP_PAD
    group_head = m % GROUP_PAD
    row_valid = (local_query < num_rows) & (group_head < GROUP)
    query = tl.load(row_query_ptr + row_begin + local_query, mask=local_query < num_rows, other=0)
    head = kv_head * GROUP + group_head
    d = tl.arange(0, HEAD_DIM_PAD)
    # A power-of-two head dim needs no column mask: masks cost registers and block vectorised loads.
    d_valid = (d < HEAD_DIM) if HEAD_DIM != HEAD_DIM_PAD else tl.full([HEAD_DIM_PAD], 1, tl.int1)

    q = tl.load(
        q_ptr + query[:, None].to(tl.int64) * stride_q_n + head[:, None] * stride_q_h + d[None, :],
        mask=row_valid[:, None] & d_valid[None, :], other=0.0,
    )
    # FP8 caches: K's scale folds into the softmax scale, V's into the output (one KV head per program, so a
    # per-head scale is one value here); tiles are converted to q's dtype in registers right after the load.
    qk_scale = sm_scale_log2
    if HAS_K_SCALE:
        qk_scale = qk_scale * load_scale(k_scale_ptr, kv_head * stride_k_scale)
    if HAS_V_SCALE:
        out_scale = out_scale * load_scale(v_scale_ptr, kv_head * stride_v_scale)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    # Offsets inside one page (slot, KV head, column) fit in int32; only the page base needs 64 bits.
    k_head = kv_head * stride_k_head
    v_head = kv_head * stride_v_head

    for start in range(0, num_tokens, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_valid = t < num_tokens
        # Masked lanes never touch memory: slots past a query's last token may hold garbage (or NaN).
        page = tl.load(kv_indices_ptr + first_page + t // PAGE_SIZE, mask=t_valid, other=0).to(tl.int64)
        slot = t % PAGE_SIZE
        kv_mask = t_valid[:, None] & d_valid[None, :]
        # One 64-bit base pointer per token row; the columns are int32 offsets from it.
        k_rows = k_ptr + page * stride_k_page + (slot * stride_k_slot + k_head)
        k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(t_valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = v_ptr + page * stride_v_page + (slot * stride_v_slot + v_head)
        v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None] * out_scale
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
    dest = tl.load(row_dest_ptr + row_begin + local_query, mask=local_query < num_rows, other=-1)
    direct = row_valid & (dest < 0)
    partial = row_valid & (dest >= 0)
    query64 = query.to(tl.int64)
    tl.store(
        out_ptr + query64[:, None] * stride_out_n + head[:, None] * stride_out_h + d[None, :],
        o.to(out_ptr.dtype.element_ty), mask=direct[:, None] & d_valid[None, :],
    )
    tl.store(lse_ptr + query64 * stride_lse_n + head, lse, mask=direct)
    dest64 = tl.maximum(dest, 0).to(tl.int64)
    tl.store(
        part_o_ptr + dest64[:, None] * stride_part_n + head[:, None] * stride_part_h + d[None, :],
        o, mask=partial[:, None] & d_valid[None, :],
    )
    tl.store(part_lse_ptr + dest64 * stride_part_lse_n + head, lse, mask=partial)


class Stage1Tile(NamedTuple):
    """Shape of a stage-1 tile: ``block_q`` queries x ``group_pad`` heads (``rows``) by ``head_dim_pad``."""

    block_q: int
    group_pad: int
    head_dim_pad: int
    num_q_blocks: int  # query blocks per item (1 unless the plan was sized for a smaller group)

    @property
    def rows(self) -> int:
        return self.block_q * self.group_pad


def stage1_tile(group: int, head_dim: int, max_queries_per_item: int) -> Stage1Tile:
    """The stage-1 tile for a GQA group and a plan's largest item. One program holds all of an item's
    queries when the plan sized items for this group (the usual case); a plan sized for a smaller group is
    split into query blocks of at most MAX_TILE_ROWS rows. tl.dot needs M >= 16: tiny groups pad the block."""
    group_pad = next_pow2(group)
    block_q = min(next_pow2(max_queries_per_item), max(1, MAX_TILE_ROWS // group_pad))
    block_q = max(block_q, 16 // min(group_pad, 16))
    num_q_blocks = triton.cdiv(max(1, max_queries_per_item), block_q)
    return Stage1Tile(block_q, group_pad, max(16, next_pow2(head_dim)), num_q_blocks)


def tree_decode_stage1_launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    item_page_ptr: torch.Tensor,
    item_num_tokens: torch.Tensor,
    item_row_ptr: torch.Tensor,
    row_query: torch.Tensor,
    row_dest: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    sm_scale: float,
    max_queries_per_item: int,
    *,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Launch | None:
    """The stage-1 launch over every work item, for tensors shaped and strided like these; call it with
    ``(q, k_cache, v_cache, out, lse, *tensor_scales(k_scale, v_scale))``. None when the plan has no work item.

    q: ``[n, Hq, D]``; k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; out: ``[n, Hq, D]``;
    lse: fp32 ``[n, Hq]``; partial_o: fp32 ``[P, Hq, D]``; partial_lse: fp32 ``[P, Hq]``.
    The caches may be FP8 (``float8_e4m3fn`` / ``float8_e5m2``) with ``k_scale`` / ``v_scale``: true K is
    ``k_cache * k_scale`` (a float, or an fp32 tensor ``[]`` / ``[1]`` / ``[Hkv]``). ``block_n`` (KV tokens per tile, a power of two >= 16), ``num_warps`` and ``num_stages`` override the
    tile table (:mod:`.configs`) for tile sweeps.
    """
    num_items = item_page_ptr.shape[0]
    if num_items == 0:
        return None
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_qo_heads // num_kv_heads
    tile = stage1_tile(group, head_dim, max_queries_per_item)
    config = tile_config("gqa_decode", device_arch(q.device), tile.head_dim_pad, tile.group_pad, q.dtype, tile.rows)
    # A float (or no) scale is folded into the float arguments; its pointer is any tensor the launch keeps.
    k_scale_ptr, stride_k_scale, k_factor, has_k_scale = scale_operand(k_scale, partial_lse)
    v_scale_ptr, stride_v_scale, v_factor, has_v_scale = scale_operand(v_scale, partial_lse)
    args = [
        q, k_cache, v_cache,
        out, lse, partial_o, partial_lse,
        kv_indices, item_page_ptr, item_num_tokens, item_row_ptr, row_query, row_dest,
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
        out.stride(0), out.stride(1),
        lse.stride(0),
        partial_o.stride(0), partial_o.stride(1),
        partial_lse.stride(0),
    ]
    slots = (0, 1, 2, 3, 4) + ((k_scale_slot,) if has_k_scale else ()) + ((v_scale_slot,) if has_v_scale else ())
    return Launch(_tree_decode_stage1_kernel, (num_items, num_kv_heads, tile.num_q_blocks), args, slots, dict(
        GROUP=group, GROUP_PAD=tile.group_pad, BLOCK_Q=tile.block_q,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=tile.head_dim_pad,
        PAGE_SIZE=page_size, BLOCK_N=block_n or config.block_n, DOT_PRECISION=dot_precision(q.dtype),
        HAS_K_SCALE=has_k_scale, HAS_V_SCALE=has_v_scale,
        num_warps=num_warps or config.num_warps, num_stages=num_stages or config.num_stages,
    ))


def tree_decode_stage1(q, k_cache, v_cache, kv_indices, item_page_ptr, item_num_tokens, item_row_ptr, row_query,
                       row_dest, out, lse, partial_o, partial_lse, sm_scale, max_queries_per_item, **options) -> None:
    """Launch stage 1 over every work item (arguments as in :func:`tree_decode_stage1_launch`)."""
    launch = tree_decode_stage1_launch(
        q, k_cache, v_cache, kv_indices, item_page_ptr, item_num_tokens, item_row_ptr, row_query, row_dest,
        out, lse, partial_o, partial_lse, sm_scale, max_queries_per_item, **options,
    )
    if launch is not None:
        launch(q, k_cache, v_cache, out, lse, *tensor_scales(options.get("k_scale"), options.get("v_scale")))


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
    # l_run is 0 only when every partial is empty (lse = -inf); a NaN partial makes it NaN, which must reach
    # the output (a NaN compares False to everything, so test for emptiness, not for "l_run > 0").
    has_kv = l_run != 0
    o = tl.where(has_kv[:, None], acc / tl.where(has_kv, l_run, 1.0)[:, None], 0.0)
    lse = tl.where(has_kv, m_run + tl.log(tl.where(has_kv, l_run, 1.0)), float("-inf"))
    tl.store(out_ptr + query * stride_out_n + h[:, None] * stride_out_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + query * stride_lse_n + h, lse, mask=h_valid)


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


def tensor_scales(*scales) -> tuple[torch.Tensor, ...]:
    """The FP8 scales a prepared stage-1 launch takes per call: the tensor ones (a float scale, or None, is
    folded into the launch's float arguments)."""
    return tuple(scale for scale in scales if isinstance(scale, torch.Tensor))


def step_runner(stage1: Launch | None, merge: Launch | None, partial_o, partial_lse, scales_are_tensors: bool):
    """``run(out, lse, *tensors, scales=(...))`` of a prepared step: stage 1 with the layer's tensors (ending
    with ``out, lse``) and, when they are tensors, its FP8 scales; then stage 2 into ``out, lse``. Shared by
    the GQA and MLA steps."""

    def run(out, lse, *tensors, scales=()) -> None:
        if stage1 is not None and scales_are_tensors:
            stage1(*tensors, *tensor_scales(*scales))
        elif stage1 is not None:
            stage1(*tensors)
        if merge is not None:
            merge(partial_o, partial_lse, out, lse)

    return run


def prepare_tree_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan,
    out: torch.Tensor,
    lse: torch.Tensor,
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    sm_scale: float,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    **stage1_options,
):
    """A decode step's launches (stage 1 over the plan's work items, then stage 2 over its merge queries),
    prepared once for tensors shaped and strided like these and for these scales: returns
    ``run(q, k_cache, v_cache, out, lse, k_scale, v_scale)``, which a later layer calls with its own tensors
    (the same layout) and scale tensors (float scales are fixed here).

    ``plan``: a ``treeattn.TreePlan`` (or anything with its device tensors and ``max_queries_per_item``);
    the partial-state workspace is the plan's, fixed per step. ``stage1_options`` are stage 1's tuning knobs.
    """
    stage1 = tree_decode_stage1_launch(
        q, k_cache, v_cache, plan.kv_indices,
        plan.item_page_ptr, plan.item_num_tokens, plan.item_row_ptr, plan.row_query, plan.row_dest,
        out, lse, partial_o, partial_lse, sm_scale, plan.max_queries_per_item,
        k_scale=k_scale, v_scale=v_scale, **stage1_options,
    )
    merge = merge_partials_launch(partial_o, partial_lse, plan.merge_query, plan.merge_ptr, out, lse)
    steps = step_runner(stage1, merge, partial_o, partial_lse, bool(tensor_scales(k_scale, v_scale)))

    def run(q, k_cache, v_cache, out, lse, k_scale=None, v_scale=None) -> None:
        steps(out, lse, q, k_cache, v_cache, out, lse, scales=(k_scale, v_scale))

    return run


def tree_decode(q, k_cache, v_cache, plan, out, lse, partial_o, partial_lse, sm_scale, k_scale=None, v_scale=None,
                **stage1_options) -> None:
    """Run a decode step (arguments as in :func:`prepare_tree_decode`)."""
    run = prepare_tree_decode(
        q, k_cache, v_cache, plan, out, lse, partial_o, partial_lse, sm_scale, k_scale, v_scale, **stage1_options
    )
    run(q, k_cache, v_cache, out, lse, k_scale, v_scale)
