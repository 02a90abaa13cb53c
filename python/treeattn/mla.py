"""MLA tree decode: DeepSeek multi-head latent attention (absorbed form) over shared-prefix trees.

Same plan, same stage-2 merge as GQA :func:`treeattn.tree_decode`; the stage-1 kernel stacks every head of
the item's queries into its M tile, since all heads read the same latent KV row (DESIGN §1, §3.4).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _dispatch, _impl_reference, _impl_triton, _impl_cuda  # noqa: F401  (backends register)
from ._validate import check_float_tensor, check_plan_matches, check_same
from .ops import decode_buffers
from .plan import PlanArgs, TreePlan

__all__ = ["mla_tree_decode"]

_SM_SCALE_HINT = (
    "sm_scale: required for MLA (the absorbed head dim 576 is not the attention's true head dim); "
    "DeepSeek-V3 uses 1/sqrt(192)·mscale² (1/sqrt(qk_nope_head_dim + qk_rope_head_dim) times the YaRN "
    "mscale squared; HF: DeepseekV3Attention.scaling)"
)


@torch.library.custom_op(
    "treeattn::mla_tree_decode_run", mutates_args=("out", "lse", "partial_o", "partial_lse")
)
def _mla_tree_decode_run(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
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
    _dispatch.run("mla_tree_decode", q.device, q, kv_cache, plan, out, lse, (partial_o, partial_lse), sm_scale)


@_mla_tree_decode_run.register_fake
def _(q, kv_cache, plan_tensors, out, lse, partial_o, partial_lse, sm_scale, page_size, max_queries_per_item):
    return None


def mla_tree_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: TreePlan,
    *,
    sm_scale: float | None = None,
    v_head_dim: int = 512,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Absorbed-MLA decode attention of every query over its paged latent KV path, shared KV read once.

    All heads of a query attend the same latent tokens: K = ``kv_cache[..., :head_dim]`` (``c_kv ‖ k_pe``)
    and V = ``kv_cache[..., :v_head_dim]`` (``c_kv``), read from the same bytes.

    Args:
        q: ``[num_queries, num_heads, head_dim]`` = ``q_nope·W_UK ‖ q_pe`` (576 = 512 + 64 for DeepSeek-V3;
            other splits such as 288 = 256 + 32 work too), fp16/bf16/fp32 (CPU: fp32/fp16 under the Triton
            interpreter). Any head count (1..128 and more).
        kv_cache: ``[num_pages, page_size, head_dim]`` latent cache (``c_kv ‖ k_pe``), q's dtype and device.
        plan: from :func:`treeattn.plan` for this step's table (``num_qo_heads=num_heads, num_kv_heads=1``
            sizes its query blocks for MLA; any plan is exact). Reuse it in every layer.
        sm_scale: **required** softmax scale. DeepSeek-V3 uses ``1/sqrt(192)·mscale²`` (qk_nope 128 +
            qk_rope 64), not ``1/sqrt(576)``.
        v_head_dim: width of V and of the output, ``1..head_dim`` (512 = kv_lora_rank for DeepSeek-V3).
        out: optional ``[num_queries, num_heads, v_head_dim]`` in q's dtype, written in place.
        lse_out: optional fp32 ``[num_queries, num_heads]`` for the LSE, written in place.
        return_lse: also return ``lse``.

    Returns:
        ``o`` ``[num_queries, num_heads, v_head_dim]`` in q's dtype (the latent output: apply ``W_UV`` and
        ``o_proj`` after), or ``(o, lse)`` with ``return_lse=True``; ``lse`` is fp32 ``[num_queries, num_heads]``,
        natural log, -inf (and ``o`` 0) for a query with empty KV. No host synchronisation and, with ``out``
        and ``lse_out`` given, no allocation after the plan's first layer: a step can be CUDA-graph captured.

    Raises:
        TypeError: ``sm_scale`` missing. ValueError: a bad argument (the message names it, with the expected
        and the actual value).

    Example:
        >>> plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=64,
        ...                      num_qo_heads=16, num_kv_heads=1)
        >>> scale = 192 ** -0.5 * mscale**2
        >>> o = treeattn.mla_tree_decode(q, kv_cache, plan, sm_scale=scale)  # q [n, 16, 576] -> o [n, 16, 512]
    """
    if sm_scale is None:
        raise TypeError(_SM_SCALE_HINT)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale: expected a finite positive float, got {sm_scale!r}")
    check_float_tensor("q", q, 3)
    check_float_tensor("kv_cache", kv_cache, 3)
    check_same("kv_cache", kv_cache, "q", q)
    if not isinstance(plan, TreePlan):
        raise ValueError(f"plan: expected a treeattn.TreePlan from treeattn.plan(...), got {type(plan).__name__}")
    num_queries, num_heads, head_dim = q.shape
    if kv_cache.shape[2] != head_dim:
        raise ValueError(
            f"kv_cache: expected head_dim {head_dim} (q.shape[2]) in dim 2, got shape {list(kv_cache.shape)}"
        )
    if isinstance(v_head_dim, bool) or not isinstance(v_head_dim, int) or not 1 <= v_head_dim <= head_dim:
        raise ValueError(f"v_head_dim: expected an int in 1..{head_dim} (q.shape[2]), got {v_head_dim!r}")
    check_plan_matches(plan, q, kv_cache, "kv_cache")
    out, lse_out, partial_o, partial_lse = decode_buffers(q, plan, out, lse_out, v_head_dim)
    torch.ops.treeattn.mla_tree_decode_run(
        q, kv_cache, plan.tensor_args(), out, lse_out, partial_o, partial_lse,
        float(sm_scale), plan.page_size, plan.max_queries_per_item,
    )
    return (out, lse_out) if return_lse else out
