"""The cache's two device ops, registered like the attention ops (one launch each, ``cuda`` -> ``triton`` ->
``reference`` per device, a fake implementation for ``torch.compile``):

- ``treeattn::kv_write_run(slots, k, v, pool, layer, k_scale=None, v_scale=None)``: scatter K/V rows (or MLA
  latent rows) into one layer of the stacked pool at flat slots, quantizing into an FP8 pool;
- ``treeattn::copy_pages_run(pool, src, dst, num_slots)``: the copies on write of one ``append``, every layer
  and plane in one launch.

``pool`` is :class:`treeattn.TreeKVCache`'s stacked ``[C, num_layers, num_pages, page_size, ...]`` (C = 2 for
K/V, 1 for MLA). Kernels: ``triton_kernels/kv_write.py`` and ``csrc/kv_write.cu``.
"""

from __future__ import annotations

import torch

from . import _dispatch, reference
from ._dispatch import register

__all__: list[str] = []  # nothing to import: the ops are reached as torch.ops.treeattn.*


@register("kv_write", "cuda")
def _kv_write_cuda(slots, k, v, pool, layer):
    torch.ops.treeattn.kv_write_cuda(slots, k, v, pool, layer)


@register("kv_write", "triton")
def _kv_write_triton(slots, k, v, pool, layer):
    # pool: the stacked [C, num_layers, num_pages, page_size, ...] (C = 2 for K/V, 1 for MLA).
    _dispatch.triton_kernels.kv_write(slots, k, pool[0, layer], v, None if v is None else pool[1, layer])


@register("kv_write", "reference")
def _kv_write_reference(slots, k, v, pool, layer, k_scale=None, v_scale=None):
    keep = (slots >= 0) & (slots < pool.shape[2] * pool.shape[3])  # out-of-range slots are skipped, as in the kernels
    dst = slots[keep]
    for plane, rows, scale in ((0, k, k_scale), (1, v, v_scale)):
        if rows is not None:
            rows = rows[keep] if scale is None else reference.quantize(rows[keep], scale[layer], pool.dtype)
            pool[plane, layer].flatten(0, 1)[dst] = rows


# FP8 pools: the write quantizes (fp32 scales [num_layers, H]); no CUDA-extension kernel does that.
@register("kv_write_fp8", "triton")
def _kv_write_fp8_triton(slots, k, v, pool, layer, k_scale, v_scale):
    _dispatch.triton_kernels.kv_write(slots, k, pool[0, layer], v, None if v is None else pool[1, layer],
                                      k_scale=k_scale[layer], v_scale=None if v is None else v_scale[layer])


register("kv_write_fp8", "reference")(_kv_write_reference)


@register("copy_pages", "triton")
def _copy_pages_triton(pool, src, dst, num_slots):
    _dispatch.triton_kernels.copy_pages(pool.flatten(0, 1), src, dst, num_slots)


@register("copy_pages", "reference")
def _copy_pages_reference(pool, src, dst, num_slots):
    planes = pool.flatten(0, 1).flatten(1, 2)  # [C * num_layers, num_pages * page_size, ...]
    page_size = pool.shape[3]
    slot = torch.arange(page_size, device=pool.device)
    used = slot[None, :] < num_slots[:, None]
    planes[:, (dst[:, None] * page_size + slot)[used]] = planes[:, (src[:, None] * page_size + slot)[used]]


def kv_write(slots, k, v, pool, layer, k_scale=None, v_scale=None) -> None:
    """``pool[0, layer]`` at flat ``slots`` = ``k`` (and ``pool[1, layer]`` = ``v`` for GQA). Slots outside
    ``[0, num_pages * page_size)`` are skipped: a negative slot is padding, and no slot writes outside the layer.
    An FP8 pool comes with fp32 ``k_scale`` (``v_scale``) ``[num_layers, H]``: the rows are quantized. The body
    of ``treeattn::kv_write_run``; eager calls with plain tensors call it directly (the op's dispatch costs
    more than the launch)."""
    if k_scale is None:
        _dispatch.run("kv_write", slots.device, slots, k, v, pool, layer)
    else:
        _dispatch.run("kv_write_fp8", slots.device, slots, k, v, pool, layer, k_scale, v_scale)


def prepare_kv_write(slots, k, v, pool, planes, k_scale=None, v_scale=None):
    """``write(layer, k, v)``: :func:`kv_write` of ``slots`` for rows laid out like ``k``, ``v`` (every layer's
    rows of one step are), with the backend chosen once and, on Triton, the launch prepared once (its grid and
    arguments; a layer's call only puts its tensors in). ``planes[layer]``: that layer's pool planes
    (``pool[c, layer]`` for each ``c``). The caller has checked the arguments, as for :func:`kv_write`."""
    if k_scale is None and _dispatch.select("kv_write", slots.device) == "triton":
        k_plane, v_plane = planes[0][0], planes[0][-1]
        kernels = _dispatch.triton_kernels
        launch = kernels.prepare_kv_write(slots, k, kernels.pool_rows(k_plane), v,
                                          None if v is None else kernels.pool_rows(v_plane))
        if launch is None:
            return lambda layer, k, v: None

        def write(layer, k, v):
            # A launch reads its per-call tensors' data pointers: the strides are the prepared ones, and each
            # layer's plane starts where its pool_rows view does (MLA: ``k`` is its own [n, 1, D] view).
            k_plane, v_plane = planes[layer][0], planes[layer][-1]
            if v is None:
                launch(slots, k, k, k_plane, k_plane)
            else:
                launch(slots, k, v, k_plane, v_plane)

        return write
    return lambda layer, k, v: kv_write(slots, k, v, pool, layer, k_scale, v_scale)


@torch.library.custom_op("treeattn::kv_write_run", mutates_args=("pool",))
def _kv_write_run(
    slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, pool: torch.Tensor, layer: int,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """:func:`kv_write` as a registered op (what ``torch.compile`` traces and tensor subclasses go through)."""
    kv_write(slots, k, v, pool, layer, k_scale, v_scale)


@_kv_write_run.register_fake
def _(slots, k, v, pool, layer, k_scale=None, v_scale=None):
    return None


@torch.library.custom_op("treeattn::copy_pages_run", mutates_args=("pool",))
def _copy_pages_run(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, num_slots: torch.Tensor) -> None:
    """For every plane ``(c, layer)`` of the stacked pool: page ``dst[i]``'s first ``num_slots[i]`` slots =
    page ``src[i]``'s."""
    _dispatch.run("copy_pages", pool.device, pool, src, dst, num_slots)


@_copy_pages_run.register_fake
def _(pool, src, dst, num_slots):
    return None
