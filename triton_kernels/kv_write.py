"""Triton kernels of the paged KV cache (``treeattn.TreeKVCache``): the per-step KV write and the
copy-on-write page copy.

``kv_write`` scatters one step's new K and V rows (or, for MLA, the one latent row) of every branch into
the pool at flat slots ``page * page_size + offset``, in one launch. ``copy_pages`` copies page prefixes
inside a stacked pool ``[C, num_layers, num_pages, page_size, ...]`` for every layer (and K and V) in one
launch: the copies one ``append`` needs when branches leave a shared, partially filled page.

Into an FP8 pool, ``kv_write`` quantizes in the same launch (``fp8.round_to_fp8``: ``x / scale``, saturating,
round to nearest even, bit for bit ``treeattn.reference.quantize``); ``copy_pages`` moves bytes whatever
the dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, next_pow2, run_kernel
from .fp8 import fp8_format, round_to_fp8

__all__ = ["copy_pages", "kv_write", "pool_rows", "prepare_kv_write"]

# Elements of a row each program moves (a power of two; masked at the row's end), and elements per tile.
_MAX_BLOCK = 1024
_TILE = 2048


@triton.jit
def _kv_write_kernel(
    slots_ptr, k_ptr, v_ptr, k_pool_ptr, v_pool_ptr,
    num_tokens, num_slots,
    stride_k_n, stride_k_h, stride_v_n, stride_v_h,
    stride_kp_slot, stride_kp_h, stride_vp_slot, stride_vp_h,
    k_scale_ptr, v_scale_ptr, stride_scale_h,
    ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr, HAS_V: tl.constexpr,
    QUANTIZE: tl.constexpr, FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """One program per (block of new tokens, block of the ``heads x head_dim`` row); a slot outside
    ``[0, num_slots)`` is skipped. ``QUANTIZE``: encode into the FP8 pool with one scale per head."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t_valid = t < num_tokens
    slot = tl.load(slots_ptr + t, mask=t_valid, other=-1)
    mask = (t_valid & (slot >= 0) & (slot < num_slots))[:, None] & (e < ROW)[None, :]
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    slot = tl.maximum(slot, 0)
    k = tl.load(k_ptr + t[:, None] * stride_k_n + (h * stride_k_h + d)[None, :], mask=mask)
    if QUANTIZE:
        k_scale = tl.load(k_scale_ptr + h * stride_scale_h, mask=e < ROW, other=1.0)
        k = round_to_fp8(k, k_scale[None, :], FP8_MANTISSA_BITS, FP8_MIN_EXP, FP8_MAX)
    tl.store(k_pool_ptr + slot[:, None] * stride_kp_slot + (h * stride_kp_h + d)[None, :],
             k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    if HAS_V:
        v = tl.load(v_ptr + t[:, None] * stride_v_n + (h * stride_v_h + d)[None, :], mask=mask)
        if QUANTIZE:
            v_scale = tl.load(v_scale_ptr + h * stride_scale_h, mask=e < ROW, other=1.0)
            v = round_to_fp8(v, v_scale[None, :], FP8_MANTISSA_BITS, FP8_MIN_EXP, FP8_MAX)
        tl.store(v_pool_ptr + slot[:, None] * stride_vp_slot + (h * stride_vp_h + d)[None, :],
                 v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def _heads_view(t: torch.Tensor) -> torch.Tensor:
    """``[n, D]`` -> ``[n, 1, D]`` so GQA ``[n, H, D]`` and MLA ``[n, D]`` rows share one kernel."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def pool_rows(pool: torch.Tensor) -> torch.Tensor:
    """One layer's pool ``[num_pages, page_size, H, D]`` (MLA: ``[num_pages, page_size, D]``) as the rows
    ``[num_pages * page_size, H, D]`` (``[.., 1, D]``) the write kernel indexes by flat slot (a view)."""
    return _heads_view(pool.flatten(0, 1))


def prepare_kv_write(
    slots: torch.Tensor,
    k: torch.Tensor,
    k_rows: torch.Tensor,
    v: torch.Tensor | None = None,
    v_rows: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> Launch | None:
    """:func:`kv_write`'s launch prepared for tensors shaped and strided like these: called as
    ``launch(slots, k3, v3, k_rows, v_rows)`` with ``k3``/``v3`` the rows as ``[n, H, D]`` (MLA: ``[n, 1, D]``;
    without ``v``, ``k3`` and ``k_rows`` again) and :func:`pool_rows` views, so the writes of one step's layers
    (same slots, rows laid out alike) compute the grid and arguments once. None when there is nothing to write.
    Arguments as in :func:`kv_write`, with the pools as :func:`pool_rows`; FP8 scales are fixed in the launch."""
    n = slots.shape[0]
    if n == 0:
        return None
    k3 = _heads_view(k)
    heads, head_dim = k3.shape[1], k3.shape[2]
    row = heads * head_dim
    has_v = v is not None
    v3, v_rows = (_heads_view(v), v_rows) if has_v else (k3, k_rows)
    block = min(next_pow2(row), _MAX_BLOCK)
    block_t = max(1, _TILE // block)  # a fixed tile per row width: no recompile per token count
    quantize = k_scale is not None
    if quantize:
        encode = fp8_format(k_rows.dtype)
        scales = (k_scale, k_scale if v_scale is None else v_scale, 1 if k_scale.numel() > 1 else 0)
    else:
        encode = dict(FP8_MANTISSA_BITS=0, FP8_MIN_EXP=0, FP8_MAX=0.0)
        scales = (slots, slots, 0)  # unused pointers
    args = [
        slots, k3, v3, k_rows, v_rows,
        n, k_rows.shape[0],
        k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
        *scales,
    ]
    grid = (-(-n // block_t), -(-row // block))
    options = dict(ROW=row, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK=block, HAS_V=has_v, QUANTIZE=quantize, **encode)
    return Launch(_kv_write_kernel, grid, args, range(5), options)


def kv_write(
    slots: torch.Tensor,
    k: torch.Tensor,
    k_pool: torch.Tensor,
    v: torch.Tensor | None = None,
    v_pool: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """``k_pool.view(-1, *row)[slots[i]] = k[i]`` (and the same for ``v``) for every ``i`` with
    ``0 <= slots[i] < num_pages * page_size``: a negative slot is padding, and no slot writes outside the pool.

    slots: int64 ``[n]`` flat slots, contiguous; k, v: ``[n, H, D]`` (GQA) or ``[n, D]`` (MLA, ``v`` None), last dim
    contiguous; k_pool, v_pool: ``[num_pages, page_size, H, D]`` or ``[num_pages, page_size, D]`` whose
    page and slot dims flatten (any view of one layer of a stacked pool does). One launch for K and V.
    FP8 pools: ``k_scale`` (and ``v_scale``), fp32 ``[H]`` or ``[1]``, and the stored value is
    ``quantize(k[i], k_scale)`` (see ``treeattn.reference.quantize``).
    """
    k_rows = pool_rows(k_pool)
    v_rows = None if v is None else pool_rows(v_pool)
    launch = prepare_kv_write(slots, k, k_rows, v, v_rows, k_scale=k_scale, v_scale=v_scale)
    if launch is not None:
        k3 = _heads_view(k)
        launch(slots, k3, k3 if v is None else _heads_view(v), k_rows, k_rows if v is None else v_rows)


@triton.jit
def _copy_pages_kernel(
    pool_ptr, src_ptr, dst_ptr, num_elems_ptr,
    stride_g, stride_page,
    BLOCK: tl.constexpr,
):
    """One program per (copy, layer-and-K/V plane, block of the page's elements)."""
    c = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_ptr + c).to(tl.int64)
    dst = tl.load(dst_ptr + c).to(tl.int64)
    mask = e < tl.load(num_elems_ptr + c)
    x = tl.load(pool_ptr + g * stride_g + src * stride_page + e, mask=mask)
    tl.store(pool_ptr + g * stride_g + dst * stride_page + e, x, mask=mask)


def copy_pages(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, num_slots: torch.Tensor) -> None:
    """For every copy ``c`` and every leading index ``g``:
    ``pool[g, dst[c], :num_slots[c]] = pool[g, src[c], :num_slots[c]]``.

    pool: ``[G, num_pages, page_size, ...]`` with each page contiguous (a stacked ``[C, L, P, S, ...]`` pool
    flattened over ``C, L``); src, dst, num_slots: int64 ``[num_copies]`` on the pool's device, ``dst``
    pages distinct from every ``src``. One launch for all copies, layers, K and V.
    """
    num_copies = src.shape[0]
    if num_copies == 0:
        return
    num_planes, page_size = pool.shape[0], pool.shape[2]
    slot_elems = pool[0, 0, 0].numel()
    block = min(next_pow2(page_size * slot_elems), _MAX_BLOCK)
    num_elems = num_slots * slot_elems
    run_kernel(
        _copy_pages_kernel, (num_copies, num_planes, -(-page_size * slot_elems // block)),
        pool, src, dst, num_elems,
        pool.stride(0), pool.stride(1),
        BLOCK=block,
    )
