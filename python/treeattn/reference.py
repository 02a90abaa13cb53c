"""fp32 ground truth for every treeattn op. Slow, simple, obviously right.

Every function here computes in fp32 on the inputs' device and returns fp32 outputs; the LSE is in
natural log. A query whose page list is empty has empty KV: its output is 0 and its LSE is -inf.
An FP8 cache (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``) holds ``value / scale``: the attention runs on
the dequantized cache ``cache.to(float32) * scale`` (:func:`dequantize`); :func:`quantize` is the
saturating, round-to-nearest-even write that produces such a cache.
"""

from __future__ import annotations

import math

import torch

from ._validate import check_kv_scale, is_fp8

__all__ = ["gather_kv_tokens", "tree_decode", "mla_tree_decode", "merge_state", "quantize", "dequantize"]


def _scale_tensor(scale, cache: torch.Tensor) -> torch.Tensor:
    """A scale (float, ``[]``, ``[1]`` or per-head ``[H]``) shaped to broadcast over ``cache``'s head dim.

    Per-head scales index dim -2 (the KV head of an NHD cache ``[..., H, D]``)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=cache.device)
    return scale[:, None] if scale.dim() == 1 and scale.numel() > 1 else scale.reshape(())


def dequantize(cache: torch.Tensor, scale=None) -> torch.Tensor:
    """fp32 values of a KV cache: ``cache.to(float32) * scale`` for FP8, plain ``cache.float()`` otherwise.

    ``scale``: float or fp32 tensor ``[]`` / ``[1]``, or ``[num_kv_heads]`` for a GQA cache
    ``[num_pages, page_size, num_kv_heads, head_dim]``.
    """
    if scale is None:
        return cache.float()
    return cache.float() * _scale_tensor(scale, cache)


def quantize(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """FP8 encoding of ``x`` (``[..., num_kv_heads, head_dim]`` or any shape with a scalar scale):
    ``x / scale`` in fp32, saturated to the format's finite range, rounded to nearest even; NaN stays NaN.

    This is the value the cache write stores; ``dequantize(quantize(x, s, dt), s)`` is ``x`` to within the
    format's precision.
    """
    if not is_fp8(dtype):
        raise ValueError(f"dtype: expected torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    limit = torch.finfo(dtype).max
    return (x.float() / _scale_tensor(scale, x)).clamp(-limit, limit).to(dtype)


def gather_kv_tokens(
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    page_size: int,
    query: int,
) -> torch.Tensor:
    """Flat token slots (``page * page_size + offset``) that ``query`` attends, in order.

    Returns an int64 tensor ``[kv_len]`` on the table's device.
    """
    start, end = int(kv_indptr[query]), int(kv_indptr[query + 1])
    pages = kv_indices[start:end].long()
    if pages.numel() == 0:
        return pages
    offsets = torch.arange(page_size, device=pages.device)
    slots = (pages[:, None] * page_size + offsets[None, :]).reshape(-1)
    kv_len = (pages.numel() - 1) * page_size + int(kv_last_page_len[query])
    return slots[:kv_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float):
    """q: [H, Dqk], k: [L, H, Dqk], v: [L, H, Dv] (already head-expanded) -> o [H, Dv], lse [H]."""
    if k.shape[0] == 0:
        return (
            q.new_zeros(q.shape[0], v.shape[-1]),
            q.new_full((q.shape[0],), float("-inf")),
        )
    scores = torch.einsum("hd,lhd->hl", q, k) * sm_scale
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.einsum("hl,lhd->hd", torch.exp(scores - lse[:, None]), v)
    return o, lse


def tree_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    *,
    sm_scale: float | None = None,
    k_scale=None,
    v_scale=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact GQA decode attention of each query over its paged KV list, in fp32.

    Args:
        q: ``[num_queries, num_qo_heads, head_dim]``.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD).
        kv_indptr: int32 ``[num_queries + 1]``; kv_indices: int32 ``[nnz]`` page ids;
        kv_last_page_len: int32 ``[num_queries]``, tokens used in each query's last page.
        sm_scale: softmax scale, default ``1/sqrt(head_dim)``.
        k_scale, v_scale: for FP8 caches (required there, None otherwise): float or fp32 tensor ``[]`` /
            ``[num_kv_heads]``; the attention runs on ``cache.to(float32) * scale``.

    Returns:
        ``o``: fp32 ``[num_queries, num_qo_heads, head_dim]``; ``lse``: fp32 ``[num_queries, num_qo_heads]``,
        natural log. Query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)``.

    Example:
        >>> o, lse = treeattn.reference.tree_decode(q, k_cache, v_cache, indptr, indices, last_len)
    """
    num_queries, num_qo_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_qo_heads // num_kv_heads
    check_kv_scale("k_scale", k_scale, k_cache, "k_cache", num_kv_heads)
    check_kv_scale("v_scale", v_scale, v_cache, "v_cache", num_kv_heads)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    k_flat = dequantize(k_cache, k_scale).reshape(-1, num_kv_heads, head_dim)
    v_flat = dequantize(v_cache, v_scale).reshape(-1, num_kv_heads, v_cache.shape[-1])
    o = q.new_zeros(num_queries, num_qo_heads, v_cache.shape[-1], dtype=torch.float32)
    lse = q.new_full((num_queries, num_qo_heads), float("-inf"), dtype=torch.float32)
    for i in range(num_queries):
        slots = gather_kv_tokens(kv_indptr, kv_indices, kv_last_page_len, page_size, i)
        k = k_flat[slots].repeat_interleave(group, dim=1)
        v = v_flat[slots].repeat_interleave(group, dim=1)
        o[i], lse[i] = _attend(q[i].float(), k, v, scale)
    return o, lse


def mla_tree_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    *,
    sm_scale: float,
    v_head_dim: int = 512,
    kv_scale=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact absorbed-MLA decode attention in fp32.

    Args:
        q: ``[num_queries, num_heads, head_dim]`` (``q_nope·W_UK ‖ q_pe``, 576 for DeepSeek-V3).
        kv_cache: ``[num_pages, page_size, head_dim]`` (``c_kv ‖ k_pe``); V is ``kv_cache[..., :v_head_dim]``.
        sm_scale: required; DeepSeek-V3 uses ``1/sqrt(192) · mscale²``.
        kv_scale: for an FP8 cache (required there, None otherwise): float or fp32 tensor ``[]``; the
            attention runs on ``kv_cache.to(float32) * kv_scale``.

    Returns:
        ``o`` fp32 ``[num_queries, num_heads, v_head_dim]``, ``lse`` fp32 ``[num_queries, num_heads]`` (natural log).
    """
    num_queries, num_heads, head_dim = q.shape
    page_size = kv_cache.shape[1]
    check_kv_scale("kv_scale", kv_scale, kv_cache, "kv_cache", None)
    kv_flat = dequantize(kv_cache, kv_scale).reshape(-1, head_dim)
    o = q.new_zeros(num_queries, num_heads, v_head_dim, dtype=torch.float32)
    lse = q.new_full((num_queries, num_heads), float("-inf"), dtype=torch.float32)
    for i in range(num_queries):
        slots = gather_kv_tokens(kv_indptr, kv_indices, kv_last_page_len, page_size, i)
        kv = kv_flat[slots][:, None, :].expand(-1, num_heads, -1)
        o[i], lse[i] = _attend(q[i].float(), kv, kv[..., :v_head_dim], float(sm_scale))
    return o, lse


def merge_state(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention states over disjoint KV sets, in fp32.

    ``o_*``: ``[n, H, D]``; ``lse_*``: ``[n, H]`` natural log. A state with zero weight (``lse = -inf``: no KV)
    contributes nothing, whatever its ``o`` holds; both ``-inf`` gives ``o = 0, lse = -inf``; a NaN in either
    state gives NaN.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    # "w == 0", not "w > 0": a NaN weight must reach the output.
    o = torch.where(w_a == 0, 0.0, o_a.float() * w_a) + torch.where(w_b == 0, 0.0, o_b.float() * w_b)
    return o, lse
