"""Public ops. Each validates its arguments (O(1), no device sync), allocates what the caller did not pass,
and calls one registered ``torch.library`` op whose implementation the dispatcher picks."""

from __future__ import annotations

import math

import torch

from . import _dispatch, _impl_reference, _impl_triton, _impl_cuda  # noqa: F401  (backends register)
from ._validate import check_float_tensor, check_out, check_plan_matches, check_same
from .plan import PlanArgs, TreePlan

__all__ = ["tree_decode", "merge_state"]


@torch.library.custom_op("treeattn::tree_decode_run", mutates_args=("out", "lse", "partial_o", "partial_lse"))
def _tree_decode_run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan_tensors: list[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    sm_scale: float,
    page_size: int,
    max_queries_per_item: int,
) -> None:
    plan = PlanArgs(plan_tensors, page_size, max_queries_per_item)
    _dispatch.run("tree_decode", q.device, q, k_cache, v_cache, plan, out, lse, (partial_o, partial_lse), sm_scale)


@_tree_decode_run.register_fake
def _(q, k_cache, v_cache, plan_tensors, out, lse, partial_o, partial_lse, sm_scale, page_size, max_queries_per_item):
    return None


def decode_buffers(q: torch.Tensor, plan: TreePlan, out, lse_out, v_head_dim: int):
    """Checks (or allocates) a decode op's outputs ``out [n, H, v_head_dim]`` (q's dtype) and ``lse_out [n, H]``
    (fp32), and returns them with the plan's fp32 partial-state workspace (allocated once per step)."""
    num_queries, num_heads = q.shape[0], q.shape[1]
    check_out("out", out, (num_queries, num_heads, v_head_dim), q.dtype, q.device)
    check_out("lse_out", lse_out, (num_queries, num_heads), torch.float32, q.device)
    if out is None:
        out = q.new_empty(num_queries, num_heads, v_head_dim)
    if lse_out is None:
        lse_out = q.new_empty(num_queries, num_heads, dtype=torch.float32)
    return (out, lse_out, *plan.workspace(num_heads, v_head_dim))


def tree_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: TreePlan,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Decode attention of every query over its paged KV path, reading shared KV once per step.

    Args:
        q: ``[num_queries, num_qo_heads, head_dim]``, fp16/bf16 (fp32 too; CPU: fp32/fp16 under the interpreter).
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD), q's dtype and device.
        plan: from :func:`treeattn.plan` for this step's table (reuse it in every layer).
        sm_scale: softmax scale, default ``1/sqrt(head_dim)``.
        out: optional ``[num_queries, num_qo_heads, head_dim]`` in q's dtype, written in place.
        lse_out: optional fp32 ``[num_queries, num_qo_heads]`` for the LSE, written in place.
        return_lse: also return ``lse`` (fp32, natural log; -inf for a query with empty KV).

    Returns:
        ``o`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``. Query head ``h`` reads KV head
        ``h // (num_qo_heads // num_kv_heads)``. No host synchronisation: a step can be CUDA-graph captured.

    Example:
        >>> plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=16)
        >>> o = treeattn.tree_decode(q, k_cache, v_cache, plan)
    """
    check_float_tensor("q", q, 3)
    check_float_tensor("k_cache", k_cache, 4)
    check_float_tensor("v_cache", v_cache, 4)
    check_same("k_cache", k_cache, "q", q)
    check_same("v_cache", v_cache, "q", q)
    if not isinstance(plan, TreePlan):
        raise ValueError(f"plan: expected a treeattn.TreePlan from treeattn.plan(...), got {type(plan).__name__}")
    num_queries, num_qo_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} (q.shape[2]) in dim 3, got shape {list(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"v_cache: expected shape [{', '.join(map(str, k_cache.shape[:3]))}, head_dim] like k_cache, got {list(v_cache.shape)}"
        )
    num_kv_heads = k_cache.shape[2]
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"q: expected num_qo_heads to be a multiple of num_kv_heads={num_kv_heads}, got {num_qo_heads}"
        )
    check_plan_matches(plan, q, k_cache, "k_cache")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    out, lse_out, partial_o, partial_lse = decode_buffers(q, plan, out, lse_out, v_cache.shape[3])
    torch.ops.treeattn.tree_decode_run(
        q, k_cache, v_cache, plan.tensor_args(), out, lse_out, partial_o, partial_lse,
        scale, plan.page_size, plan.max_queries_per_item,
    )
    return (out, lse_out) if return_lse else out


@torch.library.custom_op("treeattn::merge_state_run", mutates_args=("out", "lse_out"))
def _merge_state_run(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
    out: torch.Tensor, lse_out: torch.Tensor,
) -> None:
    _dispatch.run("merge_state", o_a.device, o_a, lse_a, o_b, lse_b, out, lse_out)


@_merge_state_run.register_fake
def _(o_a, lse_a, o_b, lse_b, out, lse_out):
    return None


def merge_state(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention states computed over disjoint KV sets.

    Args:
        o_a, o_b: ``[n, num_heads, head_dim]`` (same dtype and device).
        lse_a, lse_b: fp32 ``[n, num_heads]``, natural log (``-inf`` for an empty KV set).

    Returns:
        ``(o, lse)``: ``lse = log(exp(lse_a) + exp(lse_b))``, ``o = o_a·exp(lse_a − lse) + o_b·exp(lse_b − lse)``
        in o_a's dtype (computed in fp32); both empty gives ``o = 0, lse = -inf``.

    Example:
        >>> o, lse = treeattn.merge_state(o_prefix, lse_prefix, o_suffix, lse_suffix)
    """
    check_float_tensor("o_a", o_a, 3)
    check_float_tensor("o_b", o_b, 3)
    check_same("o_b", o_b, "o_a", o_a)
    if o_b.shape != o_a.shape:
        raise ValueError(f"o_b: expected shape {list(o_a.shape)} (same as o_a), got {list(o_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32:
            raise ValueError(f"{name}: expected an fp32 tensor, got {getattr(lse, 'dtype', type(lse).__name__)}")
        if tuple(lse.shape) != tuple(o_a.shape[:2]):
            raise ValueError(f"{name}: expected shape {list(o_a.shape[:2])}, got {list(lse.shape)}")
        if lse.device != o_a.device:
            raise ValueError(f"{name}: expected device {o_a.device} (same as o_a), got {lse.device}")
        if lse.stride(-1) != 1:
            raise ValueError(f"{name}: expected the last dim contiguous, got strides {list(lse.stride())}")
    check_out("out", out, o_a.shape, o_a.dtype, o_a.device)
    check_out("lse_out", lse_out, o_a.shape[:2], torch.float32, o_a.device)
    if out is None:
        out = torch.empty_like(o_a)
    if lse_out is None:
        lse_out = torch.empty_like(lse_a)
    torch.ops.treeattn.merge_state_run(o_a, lse_a, o_b, lse_b, out, lse_out)
    return out, lse_out
