"""Decode ops: GQA :func:`tree_decode` and absorbed-MLA :func:`mla_tree_decode`, one path for both.

Both ops are the same five stages, driven by a small per-op spec (:class:`_OpSpec`: the names of its cache
and scale arguments, its shape checks, its backends): find the step prepared for this argument layout on
the plan; otherwise validate (O(1) metadata reads, no device sync), pick the backend, prepare the launches
and keep them on the plan (``plan.prepared``); allocate the outputs the caller did not pass; run. As in a
wrapper whose ``plan()`` does the work once and whose ``run()`` only checks and calls, a later call with the
same plan and layout checks only what can change under a fixed layout (the plan's page bound, after
``plan.update_``) and launches.

Each op is also registered with ``torch.library`` (with a fake implementation); that registered op is what
``torch.compile`` traces and what tensor subclasses go through. It receives the plan's tensors, finds the
live plan they belong to (:func:`treeattn.plan.plan_of`) and reuses its prepared launches the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, overload

import torch

from . import _dispatch, reference
from ._dispatch import register
from ._validate import (
    check_cache_dtype,
    check_float_tensor,
    check_kv_scale,
    check_no_grad,
    check_out,
    check_plan_matches,
    check_positive_dims,
    check_sm_scale,
    is_fp8,
)
from .plan import PlanArgs, TreePlan, plan_of

__all__ = ["tree_decode", "mla_tree_decode", "tree_decoder", "mla_tree_decoder", "StepDecoder", "MLAStepDecoder"]


# ---- the two ops as data ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _OpSpec:
    """What differs between the decode ops.

    Backends share one calling convention (the Triton entry points' own): ``prepare(q, *caches, plan, out,
    lse, partial_o, partial_lse, sm_scale, *scales)`` returns ``run(q, *caches, out, lse, *scales)`` for
    tensors laid out like these; an FP8 scale is a tensor, a float (fixed when the run is prepared) or None.
    """

    name: str
    caches: tuple[str, ...]  # cache argument names, in calling order
    scales: tuple[str, ...]  # their FP8 scales, one per cache
    cache_ndim: int
    heads: str  # what q's dim 1 is called in messages
    check_shapes: Callable  # (q, caches, plan, v_head_dim) -> (output width, KV heads a scale may have or None)
    reference: Callable  # (q, caches, table, sm_scale, scales, width) -> fp32 (o, lse)
    triton: str  # "module.prepare function" in treeattn.triton_kernels
    input_layouts: Callable  # (caches, scales) -> their part of a call's layout key (see _decode)
    sm_scale_hint: str | None = None  # set: sm_scale is required, and this is the error without it


def _gqa_shapes(q, caches, plan, v_head_dim):
    k_cache, v_cache = caches
    check_positive_dims("k_cache", k_cache, (2, 3), "num_kv_heads and head_dim")
    page_size = plan.page_size
    if k_cache.shape[1] != page_size and k_cache.shape[2] == page_size:
        raise ValueError(
            f"k_cache: expected NHD layout [num_pages, page_size, num_kv_heads, head_dim] with page_size "
            f"{page_size} (from plan) in dim 1, got shape {list(k_cache.shape)}, which looks like HND "
            "[num_pages, num_kv_heads, page_size, head_dim]; pass k_cache.transpose(1, 2) (a view, no copy)"
        )
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache: expected head_dim {head_dim} (q.shape[2]) in dim 3, got shape {list(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {list(k_cache.shape)} (same as k_cache), got {list(v_cache.shape)}")
    num_kv_heads = k_cache.shape[2]
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"q: expected num_qo_heads to be a multiple of num_kv_heads={num_kv_heads}, got {num_qo_heads}"
        )
    return head_dim, num_kv_heads


def _mla_shapes(q, caches, plan, v_head_dim):
    (kv_cache,) = caches
    head_dim = q.shape[2]
    if kv_cache.shape[2] != head_dim:
        raise ValueError(
            f"kv_cache: expected head_dim {head_dim} (q.shape[2]) in dim 2, got shape {list(kv_cache.shape)}"
        )
    if isinstance(v_head_dim, bool) or not isinstance(v_head_dim, int) or not 1 <= v_head_dim <= head_dim:
        raise ValueError(f"v_head_dim: expected an int in 1..{head_dim} (q.shape[2]), got {v_head_dim!r}")
    return v_head_dim, None


def _gqa_reference(q, caches, table, sm_scale, scales, width):
    return reference.tree_decode(q, *caches, *table, sm_scale=sm_scale, k_scale=scales[0], v_scale=scales[1])


def _mla_reference(q, caches, table, sm_scale, scales, width):
    return reference.mla_tree_decode(q, *caches, *table, sm_scale=sm_scale, v_head_dim=width, kv_scale=scales[0])


_GQA = _OpSpec(
    "tree_decode", ("k_cache", "v_cache"), ("k_scale", "v_scale"), 4, "num_qo_heads",
    _gqa_shapes, _gqa_reference, "gqa_decode.prepare_tree_decode",
    lambda caches, scales: (_input_layout(caches[0]), _input_layout(caches[1]),
                            None if scales[0] is None else _scale_key(scales[0]),
                            None if scales[1] is None else _scale_key(scales[1])),
)
_MLA = _OpSpec(
    "mla_tree_decode", ("kv_cache",), ("kv_scale",), 3, "num_heads",
    _mla_shapes, _mla_reference, "mla_decode.prepare_mla_tree_decode",
    lambda caches, scales: (_input_layout(caches[0]), None if scales[0] is None else _scale_key(scales[0])),
    sm_scale_hint=(
        "sm_scale: required for MLA (the absorbed head dim 576 is not the attention's true head dim); "
        "DeepSeek-V3 uses 1/sqrt(192)·mscale² (1/sqrt(qk_nope_head_dim + qk_rope_head_dim) times the YaRN "
        "mscale squared; HF: DeepseekV3Attention.scaling)"
    ),
)


# ---- backends --------------------------------------------------------------------------------------------


def _prepare_triton(spec: _OpSpec, *args):
    module, function = spec.triton.split(".")
    return getattr(getattr(_dispatch.triton_kernels, module), function)(*args)


def _prepare_reference(spec: _OpSpec, q, *args):
    num_caches = len(spec.caches)
    plan, _out, _lse, _partial_o, _partial_lse, sm_scale = args[num_caches:num_caches + 6]
    table = (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)  # not the plan: runs are kept on it

    def run(q, *tensors):
        caches, (out, lse), scales = tensors[:num_caches], tensors[num_caches:num_caches + 2], tensors[num_caches + 2:]
        o_ref, lse_ref = spec.reference(q, caches, table, sm_scale, scales, out.shape[2])
        out.copy_(o_ref)
        lse.copy_(lse_ref)

    return run


def _contiguous_scales(run, num_tensors: int):
    """``run`` for scale tensors that arrive strided (a strided or expanded view): kernels index per-head
    scales with stride 1, so each call passes contiguous copies."""

    def contiguous_run(*args):
        run(*args[:num_tensors], *(s.contiguous() if isinstance(s, torch.Tensor) else s for s in args[num_tensors:]))

    return contiguous_run


# ---- registered ops (what torch.compile traces; eager calls with plain tensors skip the wrapper) ----------
# A registered op cannot take "tensor or float": an FP8 scale travels as (tensor or None, float factor).


def _split_scale(scale) -> tuple[torch.Tensor | None, float]:
    """A validated scale as the registered ops take it."""
    if isinstance(scale, torch.Tensor):
        return scale, 1.0
    return None, 1.0 if scale is None else float(scale)


def _join_scale(tensor: torch.Tensor | None, factor: float, cache: torch.Tensor):
    """Inverse of :func:`_split_scale` inside a registered op: the tensor (contiguous: kernels index per-head
    scales with stride 1), the float, or None (16-bit cache)."""
    if tensor is not None:
        return tensor if tensor.is_contiguous() else tensor.contiguous()
    return factor if is_fp8(cache.dtype) else None


def _schema(spec: _OpSpec) -> str:
    caches = "".join(f"Tensor {name}, " for name in spec.caches)
    scales = "".join(f", Tensor? {name}=None" for name in spec.scales)
    factors = "".join(f", float {name}_factor=1.0" for name in spec.scales)
    return (
        f"(Tensor q, {caches}Tensor[] plan_tensors, Tensor(a1!) out, Tensor(a2!) lse, Tensor(a3!) partial_o, "
        f"Tensor(a4!) partial_lse, float sm_scale, SymInt page_size, SymInt max_queries_per_item"
        f"{scales}{factors}) -> ()"
    )


def _registered_impl(spec: _OpSpec, *args) -> None:
    """The registered op's body: finds the plan its tensors belong to and runs (or prepares) its step there.
    Arguments as in :func:`_schema` (trailing defaults may be left out)."""
    num_caches, num_scales = len(spec.caches), len(spec.scales)
    q, caches, plan_tensors = args[0], args[1:1 + num_caches], args[1 + num_caches]
    out, lse, partial_o, partial_lse, sm_scale, page_size, max_queries = args[2 + num_caches:9 + num_caches]
    rest = args[9 + num_caches:]
    tensors = (rest[:num_scales] + (None,) * num_scales)[:num_scales]
    factors = (rest[num_scales:] + (1.0,) * num_scales)[:num_scales]
    scales = tuple(_join_scale(t, f, c) for t, f, c in zip(tensors, factors, caches))
    plan = plan_of(plan_tensors)
    if plan is not None and (plan.page_size, plan.max_queries_per_item) != (page_size, max_queries):
        plan = None  # the plan's tensors with other ints: prepare for what was passed
    backend = _dispatch.select_for(spec.name, "q", q)
    key = ("registered", spec, backend, sm_scale, _layout(q), spec.input_layouts(caches, scales), _layout(out),
           _layout(lse), _layout(partial_o), _layout(partial_lse))
    step = None if plan is None else plan.prepared.get(key)
    if step is None:
        step_plan = PlanArgs(plan_tensors, page_size, max_queries) if plan is None else plan
        run = _dispatch.implementation(spec.name, q.device, backend)(
            q, *caches, step_plan, out, lse, partial_o, partial_lse, sm_scale, *scales
        )
        if plan is not None:
            step = _remember(plan, key, _Step((), (), run))
    else:
        run = step.run
    run(q, *caches, out, lse, *scales)


def _register(spec: _OpSpec):
    op = torch.library.custom_op(
        f"treeattn::{spec.name}_run", functools.partial(_registered_impl, spec),
        mutates_args=("out", "lse", "partial_o", "partial_lse"), schema=_schema(spec),
    )
    op.register_fake(lambda *args: None)
    return op


for _spec in (_GQA, _MLA):
    register(_spec.name, "triton")(functools.partial(_prepare_triton, _spec))
    register(_spec.name, "reference")(functools.partial(_prepare_reference, _spec))
    _register(_spec)


# ---- prepared steps: what one (plan, argument layout) needs, computed on its first call ------------------


class _Step:
    """A validated (plan, argument layout) pair: the output shapes to allocate and the prepared run."""

    __slots__ = ("out_shape", "lse_shape", "run")

    def __init__(self, out_shape: tuple, lse_shape: tuple, run):
        self.out_shape, self.lse_shape, self.run = out_shape, lse_shape, run


_is_compiling = torch.compiler.is_compiling  # (looked up once: every call asks)

_MAX_STEPS_PER_PLAN = 64  # layouts seen with one plan; past this the plan's table is cleared (never unbounded)


def _layout(t) -> tuple:
    """What a launch depends on in a tensor besides its data: type, shape, strides, dtype, device."""
    return (type(t), t.shape, t.stride(), t.dtype, t.device)


def _input_layout(t) -> tuple:
    """An input's :func:`_layout` and whether it requires grad (refused with grad mode on, so such an input
    must never find a step kept for one that does not)."""
    return (type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _scale_key(scale):
    """A scale's part of a layout key: a tensor's input layout, or a float's type and value (fixed in the
    launch). (The keys skip this call for None, the usual scale, which no float or tensor key equals.)"""
    return _input_layout(scale) if isinstance(scale, torch.Tensor) else (type(scale), scale)


def _remember(plan: TreePlan, key: tuple, step: _Step) -> _Step:
    if len(plan.prepared) >= _MAX_STEPS_PER_PLAN:
        plan.prepared.clear()
    plan.prepared[key] = step
    return step


def _outputs(q, out_shape: tuple, lse_shape: tuple, out, lse_out):
    """The outputs the caller did not pass: ``out`` in q's dtype, ``lse_out`` in fp32."""
    if out is None:
        out = q.new_empty(out_shape)
    if lse_out is None:
        lse_out = q.new_empty(lse_shape, dtype=torch.float32)
    return out, lse_out


def _plain(tensors) -> bool:
    """Plain tensors run the backend directly; subclasses (fake tensors, ...) go through the registered op."""
    return all(type(t) is torch.Tensor for t in tensors)


def _validate(spec: _OpSpec, q, caches, plan, sm_scale, scales, v_head_dim):
    """Every argument check of a decode op (O(1) metadata reads): returns the softmax scale as a float, the
    output width and the FP8 scales as the kernels read them."""
    if sm_scale is None and spec.sm_scale_hint is not None:
        raise TypeError(spec.sm_scale_hint)
    if sm_scale is not None:
        sm_scale = check_sm_scale(sm_scale)
    check_float_tensor("q", q, 3)
    for name, cache in zip(spec.caches, caches):
        check_float_tensor(name, cache, spec.cache_ndim, fp8=True)
        check_cache_dtype(name, cache, "q", q)
    if not isinstance(plan, TreePlan):
        raise ValueError(f"plan: expected a treeattn.TreePlan from treeattn.plan(...), got {type(plan).__name__}")
    check_positive_dims("q", q, (1, 2), f"{spec.heads} and head_dim")
    width, scale_heads = spec.check_shapes(q, caches, plan, v_head_dim)
    scales = tuple(
        check_kv_scale(name, scale, cache, cache_name, scale_heads)
        for name, scale, cache, cache_name in zip(spec.scales, scales, caches, spec.caches)
    )
    check_plan_matches(plan, q, caches[0], spec.caches[0])
    check_no_grad((("q", q), *zip(spec.caches, caches), *zip(spec.scales, scales)))
    return (1.0 / math.sqrt(q.shape[2]) if sm_scale is None else sm_scale), width, scales


def _decode(spec: _OpSpec, q, caches: tuple, plan, sm_scale, scales: tuple, v_head_dim, out, lse_out, return_lse):
    """One decode op, both families (arguments as in :func:`tree_decode` / :func:`mla_tree_decode`)."""
    key = None
    if not _is_compiling():
        try:
            # Per-op layouts of the caches and scales: a loop over them (map, a comprehension) costs more.
            key = (spec, _dispatch.forced(), type(sm_scale), sm_scale, type(v_head_dim), v_head_dim,
                   _input_layout(q), spec.input_layouts(caches, scales), None if out is None else _layout(out),
                   None if lse_out is None else _layout(lse_out))
            step = plan.prepared[key]
        except (AttributeError, KeyError, TypeError):  # first call with this layout, or a bad argument
            step = None
        if step is not None and plan.max_page_id < caches[0].shape[0]:
            if out is None or lse_out is None:
                out, lse_out = _outputs(q, step.out_shape, step.lse_shape, out, lse_out)
            step.run(q, *caches, out, lse_out, *scales)
            return (out, lse_out) if return_lse else out
    out, lse_out, _ = _prepare_and_run(spec, q, caches, plan, sm_scale, scales, v_head_dim, out, lse_out, key)
    return (out, lse_out) if return_lse else out


def _prepare_and_run(spec: _OpSpec, q, caches: tuple, plan, sm_scale, scales: tuple, v_head_dim, out, lse_out, key):
    """A call not prepared before: validate, prepare the launch, run. Returns the outputs and the step that may
    be kept for this layout (None under ``torch.compile`` and for inputs that require grad); ``key`` set, the
    step is also kept on the plan."""
    scale, width, kernel_scales = _validate(spec, q, caches, plan, sm_scale, scales, v_head_dim)
    out_shape, lse_shape = (q.shape[0], q.shape[1], width), (q.shape[0], q.shape[1])
    check_out("out", out, out_shape, q.dtype, q.device)
    check_out("lse_out", lse_out, lse_shape, torch.float32, q.device)
    out, lse_out = _outputs(q, out_shape, lse_shape, out, lse_out)
    workspace = plan.workspace(q.shape[1], width)
    tensors = (q, *caches, out, lse_out)
    if torch.compiler.is_compiling() or not _plain(tensors):
        op = getattr(torch.ops.treeattn, f"{spec.name}_run")
        plan_tensors, page_size, max_queries = plan.tensor_args(), plan.page_size, plan.max_queries_per_item
        num_caches = len(caches)

        def run(q, *args):
            split = [_split_scale(s) for s in args[num_caches + 2:]]
            op(q, *args[:num_caches], plan_tensors, *args[num_caches:num_caches + 2], *workspace, scale, page_size,
               max_queries, *[t for t, _ in split], *[f for _, f in split])
    else:
        run = _dispatch.implementation(spec.name, q.device, _dispatch.select_for(spec.name, "q", q))(
            q, *caches, plan, out, lse_out, *workspace, scale, *kernel_scales
        )
        if any(k is not s for k, s in zip(kernel_scales, scales)):
            run = _contiguous_scales(run, len(tensors))
    run(q, *caches, out, lse_out, *scales)
    # A step kept for inputs that require grad (allowed under no_grad) would skip the grad check later.
    if torch.compiler.is_compiling() or any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (*tensors, *scales)
    ):
        return out, lse_out, None
    step = _Step(out_shape, lse_shape, run)
    if key is not None:
        _remember(plan, key, step)
    return out, lse_out, step


# ---- public ops -----------------------------------------------------------------------------------------


@overload
def tree_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan, *,
    sm_scale: float | None = ..., k_scale: torch.Tensor | float | None = ...,
    v_scale: torch.Tensor | float | None = ...,
    out: torch.Tensor | None = ..., lse_out: torch.Tensor | None = ..., return_lse: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def tree_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan, *,
    sm_scale: float | None = ..., k_scale: torch.Tensor | float | None = ...,
    v_scale: torch.Tensor | float | None = ...,
    out: torch.Tensor | None = ..., lse_out: torch.Tensor | None = ..., return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        sm_scale: softmax scale, positive and finite in fp32; default ``1/sqrt(head_dim)``.
        k_scale, v_scale: required for an FP8 cache, None otherwise: the true K is ``k_cache.to(float32) *
            k_scale`` (V likewise). A float positive and finite in fp32, or an fp32 tensor on q's device of
            shape ``[]``, ``[1]`` or ``[num_kv_heads]`` (one per KV head; any strides). The kernels dequantize
            in registers: no copy of the cache is made. Tensor values are checked on the host only for CPU
            tensors (no device sync); on the GPU a scale that is not finite and positive turns the output NaN.
        out: optional ``[num_queries, num_qo_heads, head_dim]`` in q's dtype, written in place.
        lse_out: optional fp32 ``[num_queries, num_qo_heads]`` for the LSE, written in place.
        return_lse: also return ``lse`` (fp32, natural log; -inf for a query with empty KV).

    Returns:
        ``o`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``. Query head ``h`` reads KV head
        ``h // (num_qo_heads // num_kv_heads)``. No host synchronisation, and no allocation when ``out`` and
        ``lse_out`` are given (after the plan's first layer): a step can be CUDA-graph captured. There is no
        backward: with grad mode on, inputs that require grad are refused.

    Example:
        >>> plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=16)
        >>> o = treeattn.tree_decode(q, k_cache, v_cache, plan)
    """
    return _decode(_GQA, q, (k_cache, v_cache), plan, sm_scale, (k_scale, v_scale), None, out, lse_out, return_lse)


@overload
def mla_tree_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, plan: TreePlan, *, sm_scale: float | None = ..., v_head_dim: int = ...,
    kv_scale: torch.Tensor | float | None = ..., out: torch.Tensor | None = ..., lse_out: torch.Tensor | None = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def mla_tree_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, plan: TreePlan, *, sm_scale: float | None = ..., v_head_dim: int = ...,
    kv_scale: torch.Tensor | float | None = ..., out: torch.Tensor | None = ..., lse_out: torch.Tensor | None = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        sm_scale: **required** softmax scale, positive and finite in fp32. DeepSeek-V3 uses
            ``1/sqrt(192)·mscale²`` (qk_nope 128 + qk_rope 64), not ``1/sqrt(576)``.
        v_head_dim: width of V and of the output, ``1..head_dim`` (512 = kv_lora_rank for DeepSeek-V3).
        kv_scale: required for an FP8 cache, None otherwise: the true latent row is ``kv_cache.to(float32) *
            kv_scale``; a float or an fp32 tensor ``[]`` / ``[1]`` on q's device (checked as
            :func:`tree_decode` checks ``k_scale``).
        out: optional ``[num_queries, num_heads, v_head_dim]`` in q's dtype, written in place.
        lse_out: optional fp32 ``[num_queries, num_heads]`` for the LSE, written in place.
        return_lse: also return ``lse``.

    Returns:
        ``o`` ``[num_queries, num_heads, v_head_dim]`` in q's dtype (the latent output: apply ``W_UV`` and
        ``o_proj`` after), or ``(o, lse)`` with ``return_lse=True``; ``lse`` is fp32 ``[num_queries, num_heads]``,
        natural log, -inf (and ``o`` 0) for a query with empty KV. No host synchronisation and, with ``out``
        and ``lse_out`` given, no allocation after the plan's first layer: a step can be CUDA-graph captured.
        No backward, as for :func:`tree_decode`.

    Raises:
        TypeError: ``sm_scale`` missing. ValueError: a bad argument (the message names it, with the expected
        and the actual value).

    Example:
        >>> plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=64,
        ...                      num_qo_heads=16, num_kv_heads=1)
        >>> scale = 192 ** -0.5 * mscale**2
        >>> o = treeattn.mla_tree_decode(q, kv_cache, plan, sm_scale=scale)  # q [n, 16, 576] -> o [n, 16, 512]
    """
    return _decode(_MLA, q, (kv_cache,), plan, sm_scale, (kv_scale,), v_head_dim, out, lse_out, return_lse)


# ---- a step's decoder: every layer's decode call over one plan -------------------------------------------


_NUMBERS = (float, int, type(None))


class _StepDecoder:
    """The shared part of :class:`StepDecoder` and :class:`MLAStepDecoder`: the first call is the op's own
    (every check, the launch prepared); a later call whose arguments have that call's layout (type, shape,
    strides, dtype, device of each tensor; the same ``sm_scale``, ``v_head_dim``, scales and pinned backend)
    only launches, and any other call is checked in full again (the op's errors; a failing call keeps what
    was prepared). Under ``torch.compile`` and for tensor subclasses every call is the op.

    Without ``return_lse`` (and no ``lse_out``), the LSE goes to one scratch tensor that the step's calls share."""

    __slots__ = ("_plan", "_key", "_step", "_lse")
    _spec: _OpSpec

    def __init__(self, plan: TreePlan):
        if not isinstance(plan, TreePlan):
            raise ValueError(f"plan: expected a treeattn.TreePlan from treeattn.plan(...), got {type(plan).__name__}")
        self._plan, self._key, self._step, self._lse = plan, None, None, None

    @property
    def plan(self) -> TreePlan:
        return self._plan

    def _call(self, q, caches: tuple, sm_scale, scales: tuple, v_head_dim, out, lse_out, return_lse):
        spec, plan = self._spec, self._plan
        if _is_compiling():
            return _decode(spec, q, caches, plan, sm_scale, scales, v_head_dim, out, lse_out, return_lse)
        scratch = lse_out is None and not return_lse
        key = None
        # (plain numbers only: a tensor sm_scale would compare elementwise; such calls are the op's every time)
        if type(sm_scale) in _NUMBERS and type(v_head_dim) in _NUMBERS:
            try:
                key = (_dispatch.forced(), type(sm_scale), sm_scale, type(v_head_dim), v_head_dim, _input_layout(q),
                       spec.input_layouts(caches, scales), None if out is None else _layout(out),
                       None if lse_out is None else _layout(lse_out), scratch)
            except (AttributeError, TypeError):  # a bad argument: the op names it
                pass
        step = self._step
        if key is not None and key == self._key and plan.max_page_id < caches[0].shape[0]:
            if out is None:
                out = q.new_empty(step.out_shape)
            if lse_out is None:
                lse_out = self._lse if scratch else q.new_empty(step.lse_shape, dtype=torch.float32)
            step.run(q, *caches, out, lse_out, *scales)
            return (out, lse_out) if return_lse else out
        out, lse_out, step = _prepare_and_run(spec, q, caches, plan, sm_scale, scales, v_head_dim, out, lse_out,
                                              None)
        if key is not None and step is not None:
            self._key, self._step = key, step
            self._lse = lse_out if scratch else None
        return (out, lse_out) if return_lse else out


class StepDecoder(_StepDecoder):
    """:func:`tree_decode` for every layer of one step over one plan (made by :func:`tree_decoder`):
    ``decoder(q, k_cache, v_cache, ...)`` is ``tree_decode(q, k_cache, v_cache, plan, ...)``, with the
    arguments checked on the first call and on a later call only compared with its layout (the layers' pools
    are views of one pool, laid out alike)."""

    __slots__ = ()
    _spec = _GQA

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float | None = None,
        k_scale: torch.Tensor | float | None = None, v_scale: torch.Tensor | float | None = None,
        out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None, return_lse: bool = False,
    ):
        return self._call(q, (k_cache, v_cache), sm_scale, (k_scale, v_scale), None, out, lse_out, return_lse)


class MLAStepDecoder(_StepDecoder):
    """:func:`mla_tree_decode` for every layer of one step over one plan (made by :func:`mla_tree_decoder`):
    ``decoder(q, kv_cache, sm_scale=s, ...)`` is ``mla_tree_decode(q, kv_cache, plan, sm_scale=s, ...)``,
    checked as :class:`StepDecoder` checks."""

    __slots__ = ()
    _spec = _MLA

    def __call__(
        self, q: torch.Tensor, kv_cache: torch.Tensor, *, sm_scale: float | None = None, v_head_dim: int = 512,
        kv_scale: torch.Tensor | float | None = None, out: torch.Tensor | None = None,
        lse_out: torch.Tensor | None = None, return_lse: bool = False,
    ):
        return self._call(q, (kv_cache,), sm_scale, (kv_scale,), v_head_dim, out, lse_out, return_lse)


def tree_decoder(plan: TreePlan) -> StepDecoder:
    """The decode calls of one step's layers over ``plan``: ``d = tree_decoder(plan)``, then
    ``d(q_i, **cache.layer(i))`` for each layer gives what ``tree_decode(q_i, **cache.layer(i), plan=plan)``
    gives. The first call checks every argument and prepares the launch; a later call whose arguments are laid
    out the same way (type, shape, strides, dtype, device) only launches. See :class:`StepDecoder`."""
    return StepDecoder(plan)


def mla_tree_decoder(plan: TreePlan) -> MLAStepDecoder:
    """:func:`tree_decoder` for :func:`mla_tree_decode`: ``d(q_i, **cache.layer(i), sm_scale=s)`` for each
    layer. See :class:`MLAStepDecoder`."""
    return MLAStepDecoder(plan)
