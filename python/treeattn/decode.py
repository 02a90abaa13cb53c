"""Decode ops: GQA :func:`tree_decode` and absorbed-MLA :func:`mla_tree_decode`.

A public op validates its arguments (O(1) metadata reads, no device sync), allocates the outputs the caller
did not pass, and runs the backend that serves the device: the Triton launchers of
``treeattn.triton_kernels.gqa_decode`` / ``mla_decode`` (stage 1, then the stage-2 merge) or the fp32
reference. Each op is also registered with ``torch.library`` (with a fake implementation), and that
registered op is what ``torch.compile`` traces.

The host path is paid once per layer, so its work is done once per (plan, argument layout): the first call
with a plan and tensors of given shapes, strides, dtypes and devices validates them, picks the backend and
prepares the launches; later calls with the same layout check what can change under a fixed layout (the
plan's page bound), allocate the outputs and launch. Eager calls with plain tensors run the backend
directly; other tensor types, and ``torch.compile``, go through the registered op.
"""

from __future__ import annotations

import math
import weakref

import torch

from . import _dispatch, reference
from ._dispatch import register
from ._validate import (
    check_backend_dtype, check_cache_dtype, check_float_tensor, check_kv_scale, check_out, check_plan_matches,
    check_positive_dims, check_sm_scale, is_fp8,
)
from .plan import PlanArgs, TreePlan

__all__ = ["tree_decode", "mla_tree_decode"]

_SM_SCALE_HINT = (
    "sm_scale: required for MLA (the absorbed head dim 576 is not the attention's true head dim); "
    "DeepSeek-V3 uses 1/sqrt(192)·mscale² (1/sqrt(qk_nope_head_dim + qk_rope_head_dim) times the YaRN "
    "mscale squared; HF: DeepseekV3Attention.scaling)"
)


# ---- backends: each returns a run for tensors laid out like the ones given --------------------------------
# GQA runs take (q, k_cache, v_cache, out, lse, k_scale, v_scale); MLA runs take (q, kv_cache, out, lse,
# kv_scale). FP8 scales are a tensor, a float (fixed when the run is prepared) or None (16-bit caches).


@register("tree_decode", "triton")
def _tree_decode_triton(q, k_cache, v_cache, plan, out, lse, workspace, sm_scale, k_scale, v_scale):
    return _dispatch.triton_kernels.gqa_decode.prepare_tree_decode(
        q, k_cache, v_cache, plan, out, lse, *workspace, sm_scale, k_scale, v_scale
    )


@register("tree_decode", "reference")
def _tree_decode_reference(q, k_cache, v_cache, plan, out, lse, workspace, sm_scale, k_scale, v_scale):
    table = (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)  # not the plan: runs are cached per plan

    def run(q, k_cache, v_cache, out, lse, k_scale, v_scale):
        o_ref, lse_ref = reference.tree_decode(
            q, k_cache, v_cache, *table, sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale
        )
        out.copy_(o_ref)
        lse.copy_(lse_ref)

    return run


@register("mla_tree_decode", "triton")
def _mla_tree_decode_triton(q, kv_cache, plan, out, lse, workspace, sm_scale, kv_scale):
    return _dispatch.triton_kernels.mla_decode.prepare_mla_tree_decode(
        q, kv_cache, plan, out, lse, *workspace, sm_scale, kv_scale
    )


@register("mla_tree_decode", "reference")
def _mla_tree_decode_reference(q, kv_cache, plan, out, lse, workspace, sm_scale, kv_scale):
    table = (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)  # not the plan: runs are cached per plan

    def run(q, kv_cache, out, lse, kv_scale):
        o_ref, lse_ref = reference.mla_tree_decode(
            q, kv_cache, *table, sm_scale=sm_scale, v_head_dim=out.shape[2], kv_scale=kv_scale
        )
        out.copy_(o_ref)
        lse.copy_(lse_ref)

    return run


# ---- registered ops (what torch.compile traces; eager calls with plain tensors skip the wrapper) ----------
# A registered op cannot take "tensor or float": an FP8 scale travels as (tensor or None, float factor).


def _split_scale(scale) -> tuple[torch.Tensor | None, float]:
    """A validated scale as the registered ops take it."""
    if isinstance(scale, torch.Tensor):
        return scale, 1.0
    return None, 1.0 if scale is None else float(scale)


def _join_scale(tensor: torch.Tensor | None, factor: float, cache: torch.Tensor):
    """Inverse of :func:`_split_scale` inside a registered op: the tensor, the float, or None (16-bit cache)."""
    if tensor is not None:
        return tensor
    return factor if is_fp8(cache.dtype) else None


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_scale_factor: float = 1.0,
    v_scale_factor: float = 1.0,
) -> None:
    plan = PlanArgs(plan_tensors, page_size, max_queries_per_item)
    k_scale = _join_scale(k_scale, k_scale_factor, k_cache)
    v_scale = _join_scale(v_scale, v_scale_factor, v_cache)
    prepare = _dispatch.implementation("tree_decode", q.device, _backend_for("tree_decode", q))
    run = prepare(q, k_cache, v_cache, plan, out, lse, (partial_o, partial_lse), sm_scale, k_scale, v_scale)
    run(q, k_cache, v_cache, out, lse, k_scale, v_scale)


@_tree_decode_run.register_fake
def _(q, k_cache, v_cache, plan_tensors, out, lse, partial_o, partial_lse, sm_scale, page_size, max_queries_per_item,
      k_scale=None, v_scale=None, k_scale_factor=1.0, v_scale_factor=1.0):
    return None


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
    kv_scale: torch.Tensor | None = None,
    kv_scale_factor: float = 1.0,
) -> None:
    plan = PlanArgs(plan_tensors, page_size, max_queries_per_item)
    kv_scale = _join_scale(kv_scale, kv_scale_factor, kv_cache)
    prepare = _dispatch.implementation("mla_tree_decode", q.device, _backend_for("mla_tree_decode", q))
    prepare(q, kv_cache, plan, out, lse, (partial_o, partial_lse), sm_scale, kv_scale)(q, kv_cache, out, lse, kv_scale)


@_mla_tree_decode_run.register_fake
def _(q, kv_cache, plan_tensors, out, lse, partial_o, partial_lse, sm_scale, page_size, max_queries_per_item,
      kv_scale=None, kv_scale_factor=1.0):
    return None


# ---- prepared steps: what one (plan, argument layout) needs, computed on its first call ------------------


class _Step:
    """A validated (plan, argument layout) pair: the output shapes to allocate and the prepared run."""

    __slots__ = ("out_shape", "lse_shape", "run")

    def __init__(self, out_shape: tuple, lse_shape: tuple, run):
        self.out_shape, self.lse_shape, self.run = out_shape, lse_shape, run


# plan -> {layout key: _Step}. Weak keys: a plan's steps go with the plan.
_steps: "weakref.WeakKeyDictionary[TreePlan, dict]" = weakref.WeakKeyDictionary()
_MAX_STEPS_PER_PLAN = 64  # layouts seen with one plan; past this the plan's table is cleared (never unbounded)


def _layout(t) -> tuple:
    """What a launch depends on in a tensor besides its data: type, shape, strides, dtype, device."""
    return (type(t), t.shape, t.stride(), t.dtype, t.device)


def _optional_layout(t):
    return None if t is None else _layout(t)


def _scale_key(scale):
    """A scale's part of a layout key: a tensor's layout, or a float's type and value (fixed in the launch)."""
    return _layout(scale) if isinstance(scale, torch.Tensor) else (type(scale), scale)


def _remember(plan: TreePlan, key: tuple, step: _Step) -> None:
    steps = _steps.get(plan)
    if steps is None or len(steps) >= _MAX_STEPS_PER_PLAN:
        steps = _steps[plan] = {}
    steps[key] = step


def _outputs(q, out_shape: tuple, lse_shape: tuple, out, lse_out):
    """The outputs the caller did not pass: ``out`` in q's dtype, ``lse_out`` in fp32."""
    if out is None:
        out = q.new_empty(out_shape)
    if lse_out is None:
        lse_out = q.new_empty(lse_shape, dtype=torch.float32)
    return out, lse_out


def _buffers(q: torch.Tensor, plan: TreePlan, out, lse_out, v_head_dim: int):
    """Checks (or allocates) a decode op's outputs ``out [n, H, v_head_dim]`` (q's dtype) and ``lse_out [n, H]``
    (fp32), and returns them with the plan's fp32 partial-state workspace (allocated once per step)."""
    num_queries, num_heads = q.shape[0], q.shape[1]
    out_shape, lse_shape = (num_queries, num_heads, v_head_dim), (num_queries, num_heads)
    check_out("out", out, out_shape, q.dtype, q.device)
    check_out("lse_out", lse_out, lse_shape, torch.float32, q.device)
    return (*_outputs(q, out_shape, lse_shape, out, lse_out), plan.workspace(num_heads, v_head_dim))


def _plain(tensors) -> bool:
    """Plain tensors run the backend directly; subclasses (fake tensors, ...) go through the registered op."""
    return all(type(t) is torch.Tensor for t in tensors)


def _run_and_remember(plan: TreePlan, key, run, tensors: tuple, scales: tuple, return_lse: bool):
    """Runs a step prepared by a first call (its tensors end with ``out, lse_out``) and keeps it for the
    plan's later calls with the same argument layout."""
    run(*tensors, *scales)
    out, lse_out = tensors[-2:]
    if key is not None and not torch.compiler.is_compiling():
        _remember(plan, key, _Step(tuple(out.shape), tuple(lse_out.shape), run))
    return (out, lse_out) if return_lse else out


def _backend_for(op: str, q: torch.Tensor) -> str:
    backend = _dispatch.select(op, q.device)
    check_backend_dtype("q", q, backend)
    return backend


# ---- public ops -----------------------------------------------------------------------------------------


def tree_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: TreePlan,
    *,
    sm_scale: float | None = None,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Decode attention of every query over its paged KV path, reading shared KV once per step.

    Args:
        q: ``[num_queries, num_qo_heads, head_dim]``, fp16/bf16 (fp32 too; CPU: fp32/fp16 under the interpreter).
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD), the same shape (a V head dim
            other than K's is not supported), on q's device, in q's dtype or FP8 (``torch.float8_e4m3fn`` /
            ``torch.float8_e5m2``: half the bytes read per token).
        plan: from :func:`treeattn.plan` for this step's table (reuse it in every layer).
        sm_scale: softmax scale, a finite positive number; default ``1/sqrt(head_dim)``.
        k_scale, v_scale: required for an FP8 cache, None otherwise: the true K is ``k_cache.to(float32) *
            k_scale`` (V likewise). A finite positive float, or an fp32 tensor on q's device of shape ``[]``,
            ``[1]`` or ``[num_kv_heads]`` (one per KV head). The kernels dequantize in registers: no copy of
            the cache is made. Tensor values are checked on the host only for CPU tensors (no device sync);
            on the GPU a scale that is not finite and positive turns the output NaN.
        out: optional ``[num_queries, num_qo_heads, head_dim]`` in q's dtype, written in place.
        lse_out: optional fp32 ``[num_queries, num_qo_heads]`` for the LSE, written in place.
        return_lse: also return ``lse`` (fp32, natural log; -inf for a query with empty KV).

    Returns:
        ``o`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``. Query head ``h`` reads KV head
        ``h // (num_qo_heads // num_kv_heads)``. No host synchronisation, and no allocation when ``out`` and
        ``lse_out`` are given (after the plan's first layer): a step can be CUDA-graph captured.

    Example:
        >>> plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=16)
        >>> o = treeattn.tree_decode(q, k_cache, v_cache, plan)
    """
    key = None
    if not torch.compiler.is_compiling():
        try:
            key = ("tree_decode", _dispatch.forced(), plan.max_queries_per_item, type(sm_scale), sm_scale,
                   _layout(q), _layout(k_cache), _layout(v_cache), _optional_layout(out), _optional_layout(lse_out),
                   _scale_key(k_scale), _scale_key(v_scale))
            step = _steps[plan][key]
        except (AttributeError, KeyError, TypeError):  # first call with this layout, or a bad argument
            step = None
        if step is not None and plan.max_page_id < k_cache.shape[0]:
            out, lse_out = _outputs(q, step.out_shape, step.lse_shape, out, lse_out)
            step.run(q, k_cache, v_cache, out, lse_out, k_scale, v_scale)
            return (out, lse_out) if return_lse else out
    check_float_tensor("q", q, 3)
    check_float_tensor("k_cache", k_cache, 4, fp8=True)
    check_float_tensor("v_cache", v_cache, 4, fp8=True)
    check_cache_dtype("k_cache", k_cache, "q", q)
    check_cache_dtype("v_cache", v_cache, "q", q)
    if not isinstance(plan, TreePlan):
        raise ValueError(f"plan: expected a treeattn.TreePlan from treeattn.plan(...), got {type(plan).__name__}")
    check_positive_dims("q", q, (1, 2), "num_qo_heads and head_dim")
    check_positive_dims("k_cache", k_cache, (2, 3), "num_kv_heads and head_dim")
    num_queries, num_qo_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} (q.shape[2]) in dim 3, got shape {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache: expected shape {list(k_cache.shape)} (same as k_cache), got {list(v_cache.shape)}"
        )
    num_kv_heads = k_cache.shape[2]
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"q: expected num_qo_heads to be a multiple of num_kv_heads={num_kv_heads}, got {num_qo_heads}"
        )
    check_kv_scale("k_scale", k_scale, k_cache, "k_cache", num_kv_heads)
    check_kv_scale("v_scale", v_scale, v_cache, "v_cache", num_kv_heads)
    check_plan_matches(plan, q, k_cache, "k_cache")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else check_sm_scale(sm_scale)
    out, lse_out, workspace = _buffers(q, plan, out, lse_out, head_dim)
    tensors = (q, k_cache, v_cache, out, lse_out)
    if torch.compiler.is_compiling() or not _plain(tensors):
        plan_tensors, page_size, max_queries = plan.tensor_args(), plan.page_size, plan.max_queries_per_item

        def run(q, k_cache, v_cache, out, lse_out, k_scale, v_scale):
            (k_tensor, k_factor), (v_tensor, v_factor) = _split_scale(k_scale), _split_scale(v_scale)
            torch.ops.treeattn.tree_decode_run(
                q, k_cache, v_cache, plan_tensors, out, lse_out, *workspace, scale, page_size, max_queries,
                k_tensor, v_tensor, k_factor, v_factor,
            )
    else:
        prepare = _dispatch.implementation("tree_decode", q.device, _backend_for("tree_decode", q))
        run = prepare(q, k_cache, v_cache, plan, out, lse_out, workspace, scale, k_scale, v_scale)
    return _run_and_remember(plan, key, run, tensors, (k_scale, v_scale), return_lse)


def mla_tree_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: TreePlan,
    *,
    sm_scale: float | None = None,
    v_head_dim: int = 512,
    kv_scale: torch.Tensor | float | None = None,
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
        kv_cache: ``[num_pages, page_size, head_dim]`` latent cache (``c_kv ‖ k_pe``) on q's device, in q's
            dtype or FP8 (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``).
        plan: from :func:`treeattn.plan` for this step's table (``num_qo_heads=num_heads, num_kv_heads=1``
            sizes its query blocks for MLA; any plan is exact). Reuse it in every layer.
        sm_scale: **required** softmax scale, a finite positive number. DeepSeek-V3 uses
            ``1/sqrt(192)·mscale²`` (qk_nope 128 + qk_rope 64), not ``1/sqrt(576)``.
        v_head_dim: width of V and of the output, ``1..head_dim`` (512 = kv_lora_rank for DeepSeek-V3).
        kv_scale: required for an FP8 cache, None otherwise: the true latent row is ``kv_cache.to(float32) *
            kv_scale``; a finite positive float or an fp32 tensor ``[]`` / ``[1]`` on q's device (checked as
            :func:`tree_decode` checks ``k_scale``).
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
    key = None
    if not torch.compiler.is_compiling():
        try:
            key = ("mla_tree_decode", _dispatch.forced(), plan.max_queries_per_item, type(sm_scale), sm_scale,
                   type(v_head_dim), v_head_dim, _layout(q), _layout(kv_cache),
                   _optional_layout(out), _optional_layout(lse_out), _scale_key(kv_scale))
            step = _steps[plan][key]
        except (AttributeError, KeyError, TypeError):  # first call with this layout, or a bad argument
            step = None
        if step is not None and plan.max_page_id < kv_cache.shape[0]:
            out, lse_out = _outputs(q, step.out_shape, step.lse_shape, out, lse_out)
            step.run(q, kv_cache, out, lse_out, kv_scale)
            return (out, lse_out) if return_lse else out
    if sm_scale is None:
        raise TypeError(_SM_SCALE_HINT)
    scale = check_sm_scale(sm_scale)
    check_float_tensor("q", q, 3)
    check_float_tensor("kv_cache", kv_cache, 3, fp8=True)
    check_cache_dtype("kv_cache", kv_cache, "q", q)
    if not isinstance(plan, TreePlan):
        raise ValueError(f"plan: expected a treeattn.TreePlan from treeattn.plan(...), got {type(plan).__name__}")
    check_positive_dims("q", q, (1, 2), "num_heads and head_dim")
    num_queries, num_heads, head_dim = q.shape
    if kv_cache.shape[2] != head_dim:
        raise ValueError(
            f"kv_cache: expected head_dim {head_dim} (q.shape[2]) in dim 2, got shape {list(kv_cache.shape)}"
        )
    if isinstance(v_head_dim, bool) or not isinstance(v_head_dim, int) or not 1 <= v_head_dim <= head_dim:
        raise ValueError(f"v_head_dim: expected an int in 1..{head_dim} (q.shape[2]), got {v_head_dim!r}")
    check_kv_scale("kv_scale", kv_scale, kv_cache, "kv_cache", None)
    check_plan_matches(plan, q, kv_cache, "kv_cache")
    out, lse_out, workspace = _buffers(q, plan, out, lse_out, v_head_dim)
    tensors = (q, kv_cache, out, lse_out)
    if torch.compiler.is_compiling() or not _plain(tensors):
        plan_tensors, page_size, max_queries = plan.tensor_args(), plan.page_size, plan.max_queries_per_item

        def run(q, kv_cache, out, lse_out, kv_scale):
            torch.ops.treeattn.mla_tree_decode_run(
                q, kv_cache, plan_tensors, out, lse_out, *workspace, scale, page_size, max_queries,
                *_split_scale(kv_scale),
            )
    else:
        prepare = _dispatch.implementation("mla_tree_decode", q.device, _backend_for("mla_tree_decode", q))
        run = prepare(q, kv_cache, plan, out, lse_out, workspace, scale, kv_scale)
    return _run_and_remember(plan, key, run, tensors, (kv_scale,), return_lse)
