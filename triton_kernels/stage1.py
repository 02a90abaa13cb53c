"""What the GQA and MLA stage-1 kernels share: the walk of one work item, as ``@triton.jit`` helpers the
kernels inline, and the host side of a prepared decode step.

A stage-1 program owns one work item (a page chunk and the queries that read it) and a tile of rows, each
row one (query, head) pair: it finds the item (:func:`work_item`), maps its rows (:func:`tile_rows`), walks
the chunk in ``BLOCK_N``-token tiles (:func:`kv_tokens`, :func:`load_tile`, then
:func:`.softmax.online_softmax_tile`) and writes each row's state (:func:`store_state`): straight to the
output when the query has no other item, else to the fp32 partial state that the stage-2 merge
(:mod:`.merge_partials`) folds in root→leaf order. How Q·Kᵀ is formed (one K per KV head, or the latent row
shared by all heads) is each family's own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch
from .merge_partials import merge_partials_launch
from .softmax import LN2, normalize

__all__ = [
    "PLAN_POINTERS", "columns", "kv_tokens", "load_tile", "output_strides", "plan_arrays", "step_runner",
    "store_state", "tensor_scales", "tile_rows", "work_item",
]

# The plan's index arrays are views into one packed buffer, at offsets that move with the plan's sizes: not
# specialising on their alignment keeps a new plan from compiling a new kernel (their loads gain nothing).
PLAN_POINTERS = (
    "kv_indices_ptr", "item_page_ptr", "item_num_tokens_ptr", "item_row_ptr", "row_query_ptr", "row_dest_ptr",
)


@triton.jit
def work_item(item, item_row_ptr, item_page_ptr, item_num_tokens_ptr):
    """``(row_begin, num_rows, first_page, num_tokens)`` of a work item: its rows of the plan's row arrays
    (``num_rows == 0`` for a padding item of a fixed-capacity plan) and its page chunk."""
    row_begin = tl.load(item_row_ptr + item)
    num_rows = tl.load(item_row_ptr + item + 1) - row_begin
    first_page = tl.load(item_page_ptr + item)
    num_tokens = tl.load(item_num_tokens_ptr + item)
    return row_begin, num_rows, first_page, num_tokens


@triton.jit
def tile_rows(q_block, row_begin, num_rows, row_query_ptr, BLOCK_Q: tl.constexpr, HEADS: tl.constexpr):
    """Row ``m`` of a tile is query ``m // HEADS`` of query block ``q_block`` and head ``m % HEADS`` of the
    program's heads. Returns ``(local_query, head_in_block, query_valid, query)``, each ``[BLOCK_Q * HEADS]``:
    the query's index among the item's rows, the head's index in the program's heads, whether the item has
    that query, and the query's index in ``q`` (int64)."""
    m = tl.arange(0, BLOCK_Q * HEADS)
    local_query = q_block * BLOCK_Q + m // HEADS
    query_valid = local_query < num_rows
    query = tl.load(row_query_ptr + row_begin + local_query, mask=query_valid, other=0).to(tl.int64)
    return local_query, m % HEADS, query_valid, query


@triton.jit
def columns(start, SIZE: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """``(cols, valid)``: columns ``start .. start + SIZE`` of a ``DIM``-wide row padded to ``DIM_PAD``.
    A power-of-two width needs no mask (masks cost registers and block vectorised loads)."""
    cols = start + tl.arange(0, SIZE)
    if DIM == DIM_PAD:
        valid = tl.full([SIZE], 1, tl.int1)
    else:
        valid = cols < DIM
    return cols, valid


@triton.jit
def kv_tokens(kv_indices_ptr, first_page, start, num_tokens, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(valid, page, slot)`` of tokens ``start .. start + BLOCK_N`` of an item's chunk (``page`` int64: only
    the page base needs 64 bits; offsets inside a page fit in int32)."""
    t = start + tl.arange(0, BLOCK_N)
    t_valid = t < num_tokens
    # Masked lanes never touch memory: slots past the item's last token may hold garbage (or NaN).
    page = tl.load(kv_indices_ptr + first_page + t // PAGE_SIZE, mask=t_valid, other=0).to(tl.int64)
    return t_valid, page, t % PAGE_SIZE


@triton.jit
def load_tile(rows, row_valid, cols, col_valid):
    """``tile[r, c] = *(rows[r] + cols[c])``, 0 where the row or the column is masked (masked lanes are never
    read). ``rows``: one base pointer per row (64-bit), ``cols``: int32 offsets from it."""
    return tl.load(rows[:, None] + cols[None, :], mask=row_valid[:, None] & col_valid[None, :], other=0.0)


@triton.jit
def store_state(
    acc, l_i, m_i, out_scale,
    query, head, row_valid, owns_lse, cols, col_valid,
    row_dest_ptr, row_begin, local_query, query_valid,
    out_ptr, stride_out_n, stride_out_h, lse_ptr, stride_lse_n,
    part_o_ptr, stride_part_n, stride_part_h, part_lse_ptr, stride_part_lse_n,
):
    """Writes each valid row's normalized state (``m_i`` in the exp2 domain): ``o * out_scale`` over
    ``cols`` and the natural-log lse (where ``owns_lse``: one of the programs that share a row) to the output
    when the row's ``row_dest`` is negative (its query has no other item), else to partial row ``row_dest``.
    An empty row gives 0 / -inf and a NaN one NaN (:func:`.softmax.normalize`)."""
    o, l_safe = normalize(acc, l_i)
    o = o * out_scale
    lse = (m_i + tl.log2(l_safe)) * LN2
    dest = tl.load(row_dest_ptr + row_begin + local_query, mask=query_valid, other=-1)
    direct = row_valid & (dest < 0)
    partial = row_valid & (dest >= 0)
    tl.store(
        out_ptr + query[:, None] * stride_out_n + head[:, None] * stride_out_h + cols[None, :],
        o.to(out_ptr.dtype.element_ty), mask=direct[:, None] & col_valid[None, :],
    )
    tl.store(lse_ptr + query * stride_lse_n + head, lse, mask=direct & owns_lse)
    dest64 = tl.maximum(dest, 0).to(tl.int64)
    tl.store(
        part_o_ptr + dest64[:, None] * stride_part_n + head[:, None] * stride_part_h + cols[None, :],
        o, mask=partial[:, None] & col_valid[None, :],
    )
    tl.store(part_lse_ptr + dest64 * stride_part_lse_n + head, lse, mask=partial & owns_lse)


# ---- host side ------------------------------------------------------------------------------------------

def plan_arrays(plan) -> tuple:
    """A plan's device arrays in the order the stage-1 launchers and kernels take them (``PLAN_POINTERS``).
    ``plan``: a ``treeattn.TreePlan`` (or anything with its device tensors)."""
    return (plan.kv_indices, plan.item_page_ptr, plan.item_num_tokens, plan.item_row_ptr, plan.row_query,
            plan.row_dest)


def output_strides(out, lse, partial_o, partial_lse) -> list[int]:
    """The strides of the outputs and partial states, in the order the stage-1 kernels end with them."""
    return [out.stride(0), out.stride(1), lse.stride(0),
            partial_o.stride(0), partial_o.stride(1), partial_lse.stride(0)]


def tensor_scales(*scales) -> tuple[torch.Tensor, ...]:
    """The FP8 scales a prepared stage-1 launch takes per call: the tensor ones (a float scale, or None, is
    folded into the launch's float arguments)."""
    return tuple(scale for scale in scales if isinstance(scale, torch.Tensor))


def step_runner(stage1: Launch | None, plan, out, lse, partial_o, partial_lse, scales: tuple):
    """``run(*tensors, scales=(...))`` of a prepared step: ``stage1`` (prepared for ``scales``) with the layer's
    tensors (ending with ``out, lse``) and, when they are tensors, its FP8 scales; then the stage-2 merge of
    ``plan``'s merge queries into ``out, lse`` (the last two tensors)."""
    merge = merge_partials_launch(partial_o, partial_lse, plan.merge_query, plan.merge_ptr, out, lse)
    scales_are_tensors = bool(tensor_scales(*scales))

    def run(*tensors, scales=()) -> None:
        if stage1 is not None and scales_are_tensors:
            stage1(*tensors, *tensor_scales(*scales))
        elif stage1 is not None:
            stage1(*tensors)
        if merge is not None:
            merge(partial_o, partial_lse, *tensors[-2:])

    return run
