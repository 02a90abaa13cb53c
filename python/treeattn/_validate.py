"""Argument checks shared by the public ops. Every message names the argument, the expected and the actual
value. Checks here are O(1) metadata reads: they never synchronise with the device."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_index_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of dtype torch.int32, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(t.shape)}")


def check_float_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {list(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: expected the last dim contiguous (stride 1), got strides {list(t.stride())}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must share ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (same as {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {t.device}")


def check_plan_matches(plan, q: torch.Tensor, cache: torch.Tensor, cache_name: str) -> None:
    """The plan was built for this step: same query count, page size, device, and pages inside the pool."""
    if plan.num_queries != q.shape[0]:
        raise ValueError(f"q: expected {plan.num_queries} queries (plan.num_queries), got shape {list(q.shape)}")
    if cache.shape[1] != plan.page_size:
        raise ValueError(f"{cache_name}: expected page_size {plan.page_size} (from plan) in dim 1, got {cache.shape[1]}")
    if plan.max_page_id >= cache.shape[0]:
        raise ValueError(
            f"kv_indices: expected page ids < {cache_name}.shape[0]={cache.shape[0]}, got {plan.max_page_id}"
        )
    if plan.device != q.device and not (plan.device.type == q.device.type == "cuda" and plan.device.index is None):
        raise ValueError(f"plan: expected device {q.device} (same as q), got {plan.device}")


def check_out(name: str, out, shape, dtype, device) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name}: expected shape {list(shape)}, dtype {dtype}, device {device}; "
            f"got shape {list(out.shape)}, dtype {out.dtype}, device {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {list(out.stride())}")
