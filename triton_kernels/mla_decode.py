"""Triton MLA tree decode (absorbed multi-head latent attention): stage 1 and the launcher that runs it with
the stage-2 merge (:mod:`.merge_partials`).

All heads share one latent KV row per token: ``kv = c_kv ‖ k_pe`` (``[head_dim]``, 512 + 64 for DeepSeek-V3),
with K = ``kv[:head_dim]`` and V = ``kv[:v_head_dim]``. One program per (work item, query block, head block,
V part) stacks the item's queries x heads into the M dimension of one tile (64 rows: 64 heads of one query at
128 heads, 4 queries x 16 heads at 16 heads, ...), and walks the item's page chunk in BLOCK_N-token tiles.
Each tile's V part (``kv[:, :v_head_dim]``) is loaded **once** and used as both K (``q_nope · c_kvᵀ``) and V
(``p · c_kv``); the rest of K (``k_pe``) is a second, narrow load. So every KV byte of a shared chunk is read
once for all the queries and heads of the item. The walk, the online softmax and the epilogue are the ones
every stage-1 kernel shares (:mod:`.stage1`, :mod:`.softmax`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import LOG2E, Launch, dot_precision, next_pow2
from .configs import MAX_TILE_ROWS, MIN_DOT, device_arch, dot_width, mla_tile_config, tile_config
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

# mla_tile_config lives in the tile table's module; named here for the tile sweeps that import it.
__all__ = [
    "mla_tile_config", "mla_tree_decode", "mla_tree_decode_stage1_launch",
    "prepare_mla_tree_decode",
]


# The block counts follow the plan's query blocks: specialising on them would compile a new kernel per plan.
@triton.jit(do_not_specialize=("num_head_blocks", "num_sub_blocks"), do_not_specialize_on_alignment=PLAN_POINTERS)
def _mla_tree_decode_stage1_kernel(
    q_ptr, kv_ptr,
    out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    kv_indices_ptr, item_page_ptr, item_num_tokens_ptr, item_row_ptr, row_query_ptr, row_dest_ptr,
    sm_scale_log2, kv_scale_ptr, out_scale,
    num_heads, num_head_blocks, num_sub_blocks,
    stride_q_n, stride_q_h,
    stride_kv_page, stride_kv_slot,
    stride_out_n, stride_out_h,
    stride_lse_n,
    stride_part_n, stride_part_h,
    stride_part_lse_n,
    HEAD_BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr,
    V_DIM: tl.constexpr, V_DIM_PAD: tl.constexpr, V_SPLIT: tl.constexpr,
    PE_DIM: tl.constexpr, PE_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_KV_SCALE: tl.constexpr,
):
    # K = [V part (c_kv, V_DIM wide) ‖ rest (k_pe, PE_DIM wide)]; V = the V part. With V_SPLIT = 2 this
    # program owns half of V's columns (``dv``) and also reads the other half (``dv_other``) for Q·Kᵀ, so
    # its fp32 accumulator is [rows, V_DIM_PAD / 2]; the two programs of a tile share the K tile via L2.
    V_PART: tl.constexpr = V_DIM_PAD // V_SPLIT
    static_assert_dot_size(BLOCK_Q * HEAD_BLOCK)
    static_assert_dot_size(V_PART)
    static_assert_dot_size(PE_DIM_PAD)
    static_assert_dot_size(BLOCK_N)
    tl.static_assert((V_SPLIT == 1) | (V_SPLIT == 2), "V_SPLIT: expected 1 or 2")
    # Flat grid, item-major, V part innermost: the programs that read one item's chunk run next to each
    # other (L2 reuse). num_sub_blocks = query blocks x head blocks x V_SPLIT.
    pid = tl.program_id(0)
    item = pid // num_sub_blocks
    v_part = pid % V_SPLIT
    tile = (pid % num_sub_blocks) // V_SPLIT
    q_block = tile // num_head_blocks
    h_block = tile % num_head_blocks
    row_begin, num_rows, first_page, num_tokens = work_item(item, item_row_ptr, item_page_ptr, item_num_tokens_ptr)
    # A query block past the item's queries (or a padding item of a fixed-capacity plan) has nothing to do.
    if q_block * BLOCK_Q >= num_rows:
        return
    local_query, block_head, query_valid, query = tile_rows(q_block, row_begin, num_rows, row_query_ptr,
                                                            BLOCK_Q, HEAD_BLOCK)
    head = h_block * HEAD_BLOCK + block_head
    row_valid = query_valid & (head < num_heads)

    dv, dv_valid = columns(v_part * V_PART, V_PART, V_DIM, V_DIM_PAD)
    q_rows = q_ptr + query * stride_q_n + head * stride_q_h
    q_nope = load_tile(q_rows, row_valid, dv, dv_valid)
    if V_SPLIT == 2:
        dv_other, dv_other_valid = columns((1 - v_part) * V_PART, V_PART, V_DIM, V_DIM_PAD)
        q_other = load_tile(q_rows, row_valid, dv_other, dv_other_valid)
    if PE_DIM > 0:
        dp, dp_valid = columns(V_DIM, PE_DIM_PAD, V_DIM + PE_DIM, V_DIM + PE_DIM_PAD)
        q_pe = load_tile(q_rows, row_valid, dp, dp_valid)

    # FP8 cache: the scale folds into the softmax scale (K) and the output (V); tiles are converted to q's
    # dtype in registers right after the load.
    qk_scale = sm_scale_log2
    if HAS_KV_SCALE:
        kv_scale = load_scale(kv_scale_ptr, 0)
        qk_scale = qk_scale * kv_scale
        out_scale = out_scale * kv_scale
    acc, l_i, m_i = softmax_state(BLOCK_Q * HEAD_BLOCK, V_PART)

    for start in range(0, num_tokens, BLOCK_N):
        t_valid, page, slot = kv_tokens(kv_indices_ptr, first_page, start, num_tokens, PAGE_SIZE, BLOCK_N)
        kv_rows = kv_ptr + page * stride_kv_page + slot * stride_kv_slot
        # This program's V columns, loaded once: part of K and all of its V.
        c_kv = load_tile(kv_rows, t_valid, dv, dv_valid).to(q_nope.dtype)
        qk = tl.dot(q_nope, tl.trans(c_kv), input_precision=DOT_PRECISION)
        if V_SPLIT == 2:
            c_other = load_tile(kv_rows, t_valid, dv_other, dv_other_valid).to(q_nope.dtype)
            qk += tl.dot(q_other, tl.trans(c_other), input_precision=DOT_PRECISION)
        if PE_DIM > 0:
            k_pe = load_tile(kv_rows, t_valid, dp, dp_valid).to(q_nope.dtype)
            qk += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        acc, l_i, m_i = online_softmax_tile(acc, l_i, m_i, qk * qk_scale, t_valid, c_kv, DOT_PRECISION)

    # Both programs of a split tile computed the same lse: the first stores it.
    store_state(
        acc, l_i, m_i, out_scale, query, head, row_valid, v_part == 0, dv, dv_valid,
        row_dest_ptr, row_begin, local_query, query_valid,
        out_ptr, stride_out_n, stride_out_h, lse_ptr, stride_lse_n,
        part_o_ptr, stride_part_n, stride_part_h, part_lse_ptr, stride_part_lse_n,
    )


def mla_tree_decode_stage1_launch(
    q: torch.Tensor, kv_cache: torch.Tensor, plan,
    out: torch.Tensor, lse: torch.Tensor, partial_o: torch.Tensor, partial_lse: torch.Tensor, sm_scale: float, *,
    kv_scale: torch.Tensor | float | None = None, block_m: int = MAX_TILE_ROWS, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, v_split: int | None = None,
) -> Launch | None:
    """The MLA stage-1 launch over every work item, for tensors shaped and strided like these; call it with
    ``(q, kv_cache, out, lse, *tensor_scales(kv_scale))`` (:func:`.stage1.tensor_scales`). None when the plan
    (a ``treeattn.TreePlan``: its device arrays and ``max_queries_per_item``) has no work item.

    q: ``[n, H, D]``; kv_cache: ``[num_pages, page_size, D]``; out: ``[n, H, Dv]`` (``Dv <= D``, V is
    ``kv_cache[..., :Dv]``); lse: fp32 ``[n, H]``; partial_o: fp32 ``[P, H, Dv]``; partial_lse: fp32 ``[P, H]``.
    ``block_m`` (rows per program, a power of two >= 16) caps the tile; ``block_n`` (tokens per KV tile),
    ``num_warps``, ``num_stages`` and ``v_split`` (1, or 2 programs per tile each owning half of V's
    columns) override the tile table (:mod:`.configs`) for tile sweeps.
    An FP8 ``kv_cache`` (``float8_e4m3fn`` / ``float8_e5m2``) comes with ``kv_scale`` (a float or an fp32
    tensor ``[]`` / ``[1]``): the true latent row is ``kv_cache * kv_scale``.
    """
    num_items = plan.item_page_ptr.shape[0]
    if num_items == 0:
        return None
    max_queries_per_item = plan.max_queries_per_item
    num_heads, head_dim = q.shape[1], q.shape[2]
    v_dim = out.shape[2]
    pe_dim = head_dim - v_dim
    page_size = kv_cache.shape[1]
    head_block, block_q = mla_tile_config(num_heads, max_queries_per_item, block_m)
    v_dim_pad = dot_width(v_dim)
    # Keyed by V's width and the cache's dtype: an FP8 cache's in-register conversion changes what fits.
    config = tile_config("mla_decode", device_arch(q.device), v_dim_pad, next_pow2(num_heads), kv_cache.dtype,
                         head_block * block_q)
    v_split = v_split or config.v_split
    # Only the tile sweeps' explicit knob can ask for a split the table never makes.
    if v_split not in (1, 2) or v_dim_pad // v_split < MIN_DOT:
        raise ValueError(f"v_split: expected 1, or 2 for a V of {2 * MIN_DOT} columns or more, got {v_split} "
                         f"(V {v_dim})")
    num_head_blocks = triton.cdiv(num_heads, head_block)
    num_sub_blocks = triton.cdiv(max(1, max_queries_per_item), block_q) * num_head_blocks * v_split
    # A float (or no) scale is folded into the float arguments; its pointer is any tensor the launch keeps.
    kv_scale_ptr, _, kv_factor, has_kv_scale = scale_operand(kv_scale, partial_lse)
    args = [
        q, kv_cache, out, lse, partial_o, partial_lse,
        *plan_arrays(plan),
        sm_scale * LOG2E * kv_factor,
    ]
    kv_scale_slot = len(args)
    args += [
        kv_scale_ptr, kv_factor,
        num_heads, num_head_blocks, num_sub_blocks,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        *output_strides(out, lse, partial_o, partial_lse),
    ]
    grid = (num_items * num_sub_blocks,)
    slots = (0, 1, 2, 3) + ((kv_scale_slot,) if has_kv_scale else ())
    return Launch(_mla_tree_decode_stage1_kernel, grid, args, slots, dict(
        HEAD_BLOCK=head_block, BLOCK_Q=block_q,
        V_DIM=v_dim, V_DIM_PAD=v_dim_pad, V_SPLIT=v_split,
        PE_DIM=pe_dim, PE_DIM_PAD=dot_width(pe_dim),
        PAGE_SIZE=page_size, BLOCK_N=block_n or config.block_n, DOT_PRECISION=dot_precision(q.dtype),
        HAS_KV_SCALE=has_kv_scale,
        num_warps=num_warps or config.num_warps, num_stages=num_stages or config.num_stages,
    ))


def prepare_mla_tree_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, plan,
    out: torch.Tensor, lse: torch.Tensor, partial_o: torch.Tensor, partial_lse: torch.Tensor, sm_scale: float,
    kv_scale: torch.Tensor | float | None = None, **stage1_options,
):
    """An MLA decode step's launches (stage 1, then the stage-2 merge), prepared once for tensors shaped and
    strided like these and for this scale: returns ``run(q, kv_cache, out, lse, kv_scale)``, which a later
    layer calls with its own tensors (the same layout) and scale tensor.

    ``plan``: a ``treeattn.TreePlan`` (or anything with its device tensors and ``max_queries_per_item``).
    Shapes as in :func:`mla_tree_decode_stage1_launch`; ``stage1_options`` are its tuning knobs.
    """
    stage1 = mla_tree_decode_stage1_launch(
        q, kv_cache, plan, out, lse, partial_o, partial_lse, sm_scale, kv_scale=kv_scale, **stage1_options,
    )
    steps = step_runner(stage1, plan, out, lse, partial_o, partial_lse, (kv_scale,))

    def run(q, kv_cache, out, lse, kv_scale=None) -> None:
        steps(q, kv_cache, out, lse, scales=(kv_scale,))

    return run


def mla_tree_decode(q, kv_cache, plan, out, lse, partial_o, partial_lse, sm_scale, kv_scale=None,
                    **stage1_options) -> None:
    """Run an MLA decode step (arguments as in :func:`prepare_mla_tree_decode`)."""
    run = prepare_mla_tree_decode(q, kv_cache, plan, out, lse, partial_o, partial_lse, sm_scale, kv_scale,
                                  **stage1_options)
    run(q, kv_cache, out, lse, kv_scale)
