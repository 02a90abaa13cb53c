"""The pairwise ``merge_state`` op: exact merge of two attention states over disjoint KV sets.

Backends, registered here: the CUDA extension (``csrc/merge_state.cu``), the Triton kernel
(``treeattn.triton_kernels.merge_state``) and the fp32 reference.
"""

from __future__ import annotations

import torch

from . import _dispatch, reference
from ._dispatch import register
from ._validate import check_float_tensor, check_no_grad, check_out, check_same

__all__ = ["merge_state"]


@register("merge_state", "cuda")
def _merge_state_cuda(o_a, lse_a, o_b, lse_b, out, lse_out):
    torch.ops.treeattn.merge_state_cuda(o_a, lse_a, o_b, lse_b, out, lse_out)


@register("merge_state", "triton")
def _merge_state_triton(o_a, lse_a, o_b, lse_b, out, lse_out):
    _dispatch.triton_kernels.merge_state(o_a, lse_a, o_b, lse_b, out, lse_out)


@register("merge_state", "reference")
def _merge_state_reference(o_a, lse_a, o_b, lse_b, out, lse_out):
    o, lse = reference.merge_state(o_a, lse_a, o_b, lse_b)
    out.copy_(o)
    lse_out.copy_(lse)


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
        in o_a's dtype (computed in fp32). A state with ``lse = -inf`` contributes nothing (its ``o`` is not
        used); both empty gives ``o = 0, lse = -inf``; a NaN in either state gives NaN. No backward: with grad
        mode on, inputs that require grad are refused.

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
    check_no_grad((("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)))
    if not torch.compiler.is_compiling():
        _dispatch.select_for("merge_state", "o_a", o_a)
    if out is None:
        out = torch.empty_like(o_a)
    if lse_out is None:
        lse_out = torch.empty_like(lse_a)
    torch.ops.treeattn.merge_state_run(o_a, lse_a, o_b, lse_b, out, lse_out)
    return out, lse_out
