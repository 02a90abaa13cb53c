"""Triton MLA tree decode (absorbed multi-head latent attention): stage 1 and the launcher that runs it
with the stage-2 merge it shares with GQA.

All heads share one latent KV row per token: ``kv = c_kv ‖ k_pe`` (``[head_dim]``, 512 + 64 for DeepSeek-V3),
with K = ``kv[:head_dim]`` and V = ``kv[:v_head_dim]``. One program per (work item, query block, head block)
stacks the item's queries x heads into the M dimension of one tile (64 rows: 64 heads of one query at 128
heads, 4 queries x 16 heads at 16 heads, ...), and walks the item's page chunk in BLOCK_N-token tiles. Each
tile's V part (``kv[:, :v_head_dim]``) is loaded **once** and used as both K (``q_nope · c_kvᵀ``) and V
(``p · c_kv``); the rest of K (``k_pe``) is a second, narrow load. So every KV byte of a shared chunk is read
once for all the queries and heads of the item. Online softmax in the exp2 domain; the result goes straight
to the output when the query has no other item, else to an fp32 partial state that stage 2
(:func:`.gqa_decode.merge_partials`: the merge depends only on the partial states, not on how stage 1
computed them) merges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import LOG2E, Launch, dot_precision, next_pow2
from .configs import MAX_TILE_ROWS, device_arch, tile_config
from .fp8 import load_scale, scale_operand
from .gqa_decode import merge_partials_launch, step_runner, tensor_scales

__all__ = [
    "mla_tile_config", "mla_tree_decode", "mla_tree_decode_stage1", "mla_tree_decode_stage1_launch",
    "prepare_mla_tree_decode",
]


# The plan's index arrays move inside one packed buffer with its sizes, and the block counts follow its query
# blocks: specialising on either would compile a new kernel for a new plan, for nothing.
_PLAN_POINTERS = ("kv_indices_ptr", "item_page_ptr", "item_num_tokens_ptr", "item_row_ptr", "row_query_ptr", "row_dest_ptr")


@triton.jit(do_not_specialize=("num_head_blocks", "num_sub_blocks"), do_not_specialize_on_alignment=_PLAN_POINTERS)
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
    # Flat grid, item-major, V part innermost: the programs that read one item's chunk run next to each
    # other (L2 reuse). num_sub_blocks = query blocks x head blocks x V_SPLIT.
    pid = tl.program_id(0)
    item = pid // num_sub_blocks
    v_part = pid % V_SPLIT
    tile = (pid % num_sub_blocks) // V_SPLIT
    q_block = tile // num_head_blocks
    h_block = tile % num_head_blocks
    row_begin = tl.load(item_row_ptr + item)
    num_rows = tl.load(item_row_ptr + item + 1) - row_begin
    first_page = tl.load(item_page_ptr + item)
    num_tokens = tl.load(item_num_tokens_ptr + item)
    # A query block past the item's queries (or a padding item of a fixed-capacity plan) has nothing to do.
    if q_block * BLOCK_Q >= num_rows:
        return

    # Row m of the tile is (query m // HEAD_BLOCK of this query block, head m % HEAD_BLOCK of this head block).
    m = tl.arange(0, BLOCK_Q * HEAD_BLOCK)
    local_query = q_block * BLOCK_Q + m // HEAD_BLOCK
    head = h_block * HEAD_BLOCK + m % HEAD_BLOCK
    query_valid = local_query < num_rows
    row_valid = query_valid & (head < num_heads)
    query = tl.load(row_query_ptr + row_begin + local_query, mask=query_valid, other=0).to(tl.int64)

    # K = [V part (c_kv, V_DIM wide) ‖ rest (k_pe, PE_DIM wide)]; V = the V part. With V_SPLIT = 2 this
    # program owns half of V's columns (``dv``) and also reads the other half (``dv_other``) for Q·Kᵀ, so
    # its fp32 accumulator is [rows, V_DIM_PAD / 2]; the two programs of a tile share the K tile via L2.
    V_PART: tl.constexpr = V_DIM_PAD // V_SPLIT
    dv = v_part * V_PART + tl.arange(0, V_PART)
    # Power-of-two widths need no column masks (masks cost registers and block vectorised loads).
    dv_valid = (dv < V_DIM) if V_DIM != V_DIM_PAD else tl.full([V_PART], 1, tl.int1)
    q_rows = q_ptr + query[:, None] * stride_q_n + head[:, None] * stride_q_h
    q_nope = tl.load(q_rows + dv[None, :], mask=row_valid[:, None] & dv_valid[None, :], other=0.0)
    if V_SPLIT == 2:
        dv_other = (1 - v_part) * V_PART + tl.arange(0, V_PART)
        dv_other_valid = (dv_other < V_DIM) if V_DIM != V_DIM_PAD else tl.full([V_PART], 1, tl.int1)
        q_other = tl.load(q_rows + dv_other[None, :], mask=row_valid[:, None] & dv_other_valid[None, :], other=0.0)
    if PE_DIM > 0:
        dp = tl.arange(0, PE_DIM_PAD)
        dp_valid = (dp < PE_DIM) if PE_DIM != PE_DIM_PAD else tl.full([PE_DIM_PAD], 1, tl.int1)
        q_pe = tl.load(q_rows + V_DIM + dp[None, :], mask=row_valid[:, None] & dp_valid[None, :], other=0.0)

    # FP8 cache: the scale folds into the softmax scale (K) and the output (V); tiles are converted to q's
    # dtype in registers right after the load.
    qk_scale = sm_scale_log2
    if HAS_KV_SCALE:
        kv_scale = load_scale(kv_scale_ptr, 0)
        qk_scale = qk_scale * kv_scale
        out_scale = out_scale * kv_scale
    m_i = tl.full([BLOCK_Q * HEAD_BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * HEAD_BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * HEAD_BLOCK, V_PART], dtype=tl.float32)

    for start in range(0, num_tokens, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_valid = t < num_tokens
        # Masked lanes never touch memory: slots past the item's last token may hold garbage (or NaN).
        page = tl.load(kv_indices_ptr + first_page + t // PAGE_SIZE, mask=t_valid, other=0).to(tl.int64)
        # One 64-bit base pointer per token row; the in-row columns are int32 offsets from it.
        kv_rows = kv_ptr + page * stride_kv_page + (t % PAGE_SIZE) * stride_kv_slot
        # This program's V columns, loaded once: part of K and all of its V.
        c_kv = tl.load(
            kv_rows[:, None] + dv[None, :], mask=t_valid[:, None] & dv_valid[None, :], other=0.0
        ).to(q_nope.dtype)
        scores = tl.dot(q_nope, tl.trans(c_kv), input_precision=DOT_PRECISION)
        if V_SPLIT == 2:
            c_other = tl.load(
                kv_rows[:, None] + dv_other[None, :], mask=t_valid[:, None] & dv_other_valid[None, :], other=0.0
            ).to(q_nope.dtype)
            scores += tl.dot(q_other, tl.trans(c_other), input_precision=DOT_PRECISION)
        if PE_DIM > 0:
            k_pe = tl.load(
                kv_rows[:, None] + V_DIM + dp[None, :], mask=t_valid[:, None] & dp_valid[None, :], other=0.0
            ).to(q_nope.dtype)
            scores += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        scores = tl.where(t_valid[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q_nope.dtype), c_kv, input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i is 0 only in a program with no tokens (a query block past the item's queries): nothing is stored.
    # A NaN score makes l_i NaN, which must reach the output ("l_i > 0" would be False for it).
    l_safe = tl.where(l_i == 0, 1.0, l_i)
    o = acc / l_safe[:, None] * out_scale
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log
    dest = tl.load(row_dest_ptr + row_begin + local_query, mask=query_valid, other=-1)
    direct = row_valid & (dest < 0)
    partial = row_valid & (dest >= 0)
    # Both programs of a split tile computed the same lse: the first stores it.
    tl.store(
        out_ptr + query[:, None] * stride_out_n + head[:, None] * stride_out_h + dv[None, :],
        o.to(out_ptr.dtype.element_ty), mask=direct[:, None] & dv_valid[None, :],
    )
    tl.store(lse_ptr + query * stride_lse_n + head, lse, mask=direct & (v_part == 0))
    dest64 = tl.maximum(dest, 0).to(tl.int64)
    tl.store(
        part_o_ptr + dest64[:, None] * stride_part_n + head[:, None] * stride_part_h + dv[None, :],
        o, mask=partial[:, None] & dv_valid[None, :],
    )
    tl.store(part_lse_ptr + dest64 * stride_part_lse_n + head, lse, mask=partial & (v_part == 0))


def mla_tile_config(num_heads: int, max_queries_per_item: int, block_m: int = MAX_TILE_ROWS) -> tuple[int, int]:
    """``(head_block, block_q)`` of the stage-1 M tile: ``head_block`` heads of ``block_q`` queries.

    Heads fill the tile first (up to ``block_m``), then queries of the item; the tile has at least 16 rows
    (``tl.dot``'s minimum) and every size is a power of two, so it is GPU-legal for any head count.
    """
    head_block = min(next_pow2(num_heads), block_m)
    block_q = min(next_pow2(max(1, max_queries_per_item)), max(1, block_m // head_block))
    block_q = max(block_q, 16 // min(head_block, 16))
    return head_block, block_q


def mla_tree_decode_stage1_launch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
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
    kv_scale: torch.Tensor | float | None = None,
    block_m: int = MAX_TILE_ROWS,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    v_split: int | None = None,
) -> Launch | None:
    """The MLA stage-1 launch over every work item, for tensors shaped and strided like these; call it with
    ``(q, kv_cache, out, lse, *tensor_scales(kv_scale))``. None when the plan has no work item.

    q: ``[n, H, D]``; kv_cache: ``[num_pages, page_size, D]``; out: ``[n, H, Dv]`` (``Dv <= D``, V is
    ``kv_cache[..., :Dv]``); lse: fp32 ``[n, H]``; partial_o: fp32 ``[P, H, Dv]``; partial_lse: fp32 ``[P, H]``.
    ``block_m`` (rows per program, a power of two >= 16) caps the tile; ``block_n`` (tokens per KV tile),
    ``num_warps``, ``num_stages`` and ``v_split`` (1, or 2 programs per tile each owning half of V's
    columns) override the tile table (:mod:`.configs`) for tile sweeps.
    An FP8 ``kv_cache`` (``float8_e4m3fn`` / ``float8_e5m2``) comes with ``kv_scale`` (a float or an fp32
    tensor ``[]`` / ``[1]``): the true latent row is ``kv_cache * kv_scale``.
    """
    num_items = item_page_ptr.shape[0]
    if num_items == 0:
        return None
    num_heads, head_dim = q.shape[1], q.shape[2]
    v_dim = out.shape[2]
    pe_dim = head_dim - v_dim
    page_size = kv_cache.shape[1]
    head_block, block_q = mla_tile_config(num_heads, max_queries_per_item, block_m)
    v_dim_pad = max(16, next_pow2(v_dim))
    # Keyed by the cache's dtype: an FP8 cache's in-register conversion changes what fits.
    config = tile_config("mla_decode", device_arch(q.device), v_dim_pad, next_pow2(num_heads), kv_cache.dtype,
                         head_block * block_q)
    v_split = v_split or config.v_split
    if v_split not in (1, 2) or (v_split == 2 and v_dim_pad < 32):
        raise ValueError(f"v_split: expected 1, or 2 for a V of 32 columns or more, got {v_split} (V {v_dim})")
    num_head_blocks = triton.cdiv(num_heads, head_block)
    num_sub_blocks = triton.cdiv(max(1, max_queries_per_item), block_q) * num_head_blocks * v_split
    # A float (or no) scale is folded into the float arguments; its pointer is any tensor the launch keeps.
    kv_scale_ptr, _, kv_factor, has_kv_scale = scale_operand(kv_scale, partial_lse)
    args = [
        q, kv_cache,
        out, lse, partial_o, partial_lse,
        kv_indices, item_page_ptr, item_num_tokens, item_row_ptr, row_query, row_dest,
        sm_scale * LOG2E * kv_factor,
    ]
    kv_scale_slot = len(args)
    args += [
        kv_scale_ptr, kv_factor,
        num_heads, num_head_blocks, num_sub_blocks,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0),
        partial_o.stride(0), partial_o.stride(1),
        partial_lse.stride(0),
    ]
    grid = (num_items * num_sub_blocks,)
    slots = (0, 1, 2, 3) + ((kv_scale_slot,) if has_kv_scale else ())
    return Launch(_mla_tree_decode_stage1_kernel, grid, args, slots, dict(
        HEAD_BLOCK=head_block, BLOCK_Q=block_q,
        V_DIM=v_dim, V_DIM_PAD=v_dim_pad, V_SPLIT=v_split,
        PE_DIM=pe_dim, PE_DIM_PAD=max(16, next_pow2(pe_dim)) if pe_dim > 0 else 16,
        PAGE_SIZE=page_size, BLOCK_N=block_n or config.block_n, DOT_PRECISION=dot_precision(q.dtype),
        HAS_KV_SCALE=has_kv_scale,
        num_warps=num_warps or config.num_warps, num_stages=num_stages or config.num_stages,
    ))


def mla_tree_decode_stage1(q, kv_cache, kv_indices, item_page_ptr, item_num_tokens, item_row_ptr, row_query,
                           row_dest, out, lse, partial_o, partial_lse, sm_scale, max_queries_per_item, **options):
    """Launch MLA stage 1 over every work item (arguments as in :func:`mla_tree_decode_stage1_launch`)."""
    launch = mla_tree_decode_stage1_launch(
        q, kv_cache, kv_indices, item_page_ptr, item_num_tokens, item_row_ptr, row_query, row_dest,
        out, lse, partial_o, partial_lse, sm_scale, max_queries_per_item, **options,
    )
    if launch is not None:
        launch(q, kv_cache, out, lse, *tensor_scales(options.get("kv_scale")))


def prepare_mla_tree_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    plan,
    out: torch.Tensor,
    lse: torch.Tensor,
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    sm_scale: float,
    kv_scale: torch.Tensor | float | None = None,
    **stage1_options,
):
    """An MLA decode step's launches (stage 1, then the stage-2 merge shared with GQA), prepared once for
    tensors shaped and strided like these and for this scale: returns ``run(q, kv_cache, out, lse, kv_scale)``,
    which a later layer calls with its own tensors (the same layout) and scale tensor.

    ``plan``: a ``treeattn.TreePlan`` (or anything with its device tensors and ``max_queries_per_item``).
    Shapes as in :func:`mla_tree_decode_stage1_launch`; ``stage1_options`` are its tuning knobs.
    """
    stage1 = mla_tree_decode_stage1_launch(
        q, kv_cache, plan.kv_indices,
        plan.item_page_ptr, plan.item_num_tokens, plan.item_row_ptr, plan.row_query, plan.row_dest,
        out, lse, partial_o, partial_lse, sm_scale, plan.max_queries_per_item, kv_scale=kv_scale, **stage1_options,
    )
    merge = merge_partials_launch(partial_o, partial_lse, plan.merge_query, plan.merge_ptr, out, lse)
    steps = step_runner(stage1, merge, partial_o, partial_lse, bool(tensor_scales(kv_scale)))

    def run(q, kv_cache, out, lse, kv_scale=None) -> None:
        steps(out, lse, q, kv_cache, out, lse, scales=(kv_scale,))

    return run


def mla_tree_decode(q, kv_cache, plan, out, lse, partial_o, partial_lse, sm_scale, kv_scale=None,
                    **stage1_options) -> None:
    """Run an MLA decode step (arguments as in :func:`prepare_mla_tree_decode`)."""
    run = prepare_mla_tree_decode(q, kv_cache, plan, out, lse, partial_o, partial_lse, sm_scale, kv_scale,
                                  **stage1_options)
    run(q, kv_cache, out, lse, kv_scale)
