"""Argument checks shared by the public ops. Every message names the argument, the expected and the actual
value. Checks here are O(1) metadata reads: they never synchronise with the device."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high]`` (``high`` None: no upper bound). Accepts ``int`` and numpy
    integers (anything with ``__index__``); refuses ``bool`` (``True`` is not a page size) with TypeError, and
    out-of-range values with ValueError."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}") from None
    if number < low or (high is not None and number > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {expected}, got {number}")
    return number


def check_index_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of dtype torch.int32, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(t.shape)}")


def check_float_tensor(name: str, t, ndim: int, *, fp8: bool = False) -> None:
    """A floating tensor with ``ndim`` dims and a contiguous last dim; ``fp8`` also admits the FP8 formats
    (KV caches)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES and not (fp8 and is_fp8(t.dtype)):
        expected = "float16, bfloat16, float32, float8_e4m3fn or float8_e5m2" if fp8 else "float16, bfloat16 or float32"
        raise ValueError(f"{name}: expected dtype {expected}, got {t.dtype}")
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
        raise ValueError(
            f"{cache_name}: expected page_size {plan.page_size} (from plan) in dim 1, got {cache.shape[1]}"
        )
    if plan.max_page_id >= cache.shape[0]:
        raise ValueError(
            f"kv_indices: expected page ids < {cache_name}.shape[0]={cache.shape[0]}, got {plan.max_page_id}"
        )
    if plan.device != q.device and not (plan.device.type == q.device.type == "cuda" and plan.device.index is None):
        raise ValueError(f"plan: expected device {q.device} (same as q), got {plan.device}")


def check_positive_dims(name: str, t: torch.Tensor, dims: tuple[int, ...], what: str) -> None:
    """``t.shape[d] >= 1`` for every ``d`` in ``dims`` (head counts and head dims; ``what`` names them)."""
    if any(t.shape[d] < 1 for d in dims):
        raise ValueError(f"{name}: expected {what} >= 1, got shape {list(t.shape)}")


_FP32 = torch.finfo(torch.float32)


def check_positive_scale(name: str, value, what: str = "real number") -> float:
    """A scale the kernels take as an fp32 argument: a real number (not a bool, a string or a tensor) that is
    positive and finite in fp32 (a value past fp32's maximum would become inf there, and the output NaN; one
    below its smallest subnormal, 0). Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a finite positive {what}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive {what}, got {value!r}")
    if not _FP32.tiny * 2**-23 <= value <= _FP32.max:
        raise ValueError(
            f"{name}: expected a positive number representable in fp32 (in [{_FP32.tiny * 2**-23:.4g}, "
            f"{_FP32.max:.6g}]), got {value!r}"
        )
    return float(value)


def check_sm_scale(sm_scale) -> float:
    """A softmax scale: positive and finite in fp32 (:func:`check_positive_scale`); returns it as a float."""
    return check_positive_scale("sm_scale", sm_scale)


def check_no_grad(named_tensors) -> None:
    """The ops have no backward: with grad mode on, an input that requires grad would give an output that
    silently does not. ``named_tensors``: ``(name, tensor or None or float)`` pairs."""
    if not torch.is_grad_enabled():
        return
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(
                f"{name}: expected a tensor that does not require grad (treeattn's attention ops have no "
                f"backward; call them under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()), "
                "got requires_grad=True"
            )


def check_device(device) -> torch.device:
    """A CPU or CUDA device that exists here (``None`` is the caller's to resolve); CUDA devices get their
    index."""
    expected = "a CPU or CUDA torch.device or device string ('cpu', 'cuda', 'cuda:1')"
    if isinstance(device, (bool, np.bool_)):
        raise TypeError(f"device: expected {expected}, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected {expected}, got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device: expected {expected}, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device: expected an available device, got {device!r} but CUDA is not available "
            "(torch.cuda.is_available() is False); pass device='cpu', or leave device out for the default"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device: expected a CUDA index < {torch.cuda.device_count()} (devices present), got {device!r}"
        )
    return torch.device("cuda", index)


def check_backend_dtype(name: str, t: torch.Tensor, backend: str) -> None:
    """Triton on CPU runs in its interpreter, which computes with numpy: no bfloat16 there."""
    if backend == "triton" and t.dtype == torch.bfloat16 and t.device.type == "cpu":
        raise ValueError(
            f"{name}: expected float16 or float32 for Triton on CPU (its interpreter computes with numpy, "
            "which has no bfloat16), got torch.bfloat16; run on a GPU or with TREEATTN_BACKEND=reference"
        )


def check_out(name: str, out, shape, dtype, device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name}: expected shape {list(shape)}, dtype {dtype}, device {device}; "
            f"got shape {list(out.shape)}, dtype {out.dtype}, device {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {list(out.stride())}")


# FP8 KV caches (stored values times a per-tensor or per-KV-head fp32 scale give the true K/V).
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def check_cache_dtype(name: str, cache: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """A KV cache is in ``ref``'s dtype (16/32-bit) or in an FP8 format, on ``ref``'s device."""
    if not is_fp8(cache.dtype):
        check_same(name, cache, ref_name, ref)
    elif cache.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {cache.device}")


def check_kv_scale(
    name: str, scale, cache: torch.Tensor, cache_name: str, num_heads: int | None, *,
    num_layers: int | None = None, read_device_values: bool = False,
):
    """Validate the dequantization scale of ``cache``: true values are ``cache.to(float32) * scale``.

    An FP8 cache needs a scale; a 16/32-bit cache takes none. A scale is a finite positive Python float or
    an fp32 tensor on the cache's device with one element or, when ``num_heads`` is given (GQA),
    ``[num_heads]`` (one per KV head); with ``num_layers`` (a cache's scales for all its layers) also
    ``[num_layers, num_heads]`` (MLA: ``[num_layers]``). Values are checked where that costs no device sync
    (Python floats, CPU tensors outside torch.compile) or when ``read_device_values``; the kernels turn any
    other bad scale into NaN output, never a plausible answer.

    Returns the scale as kernels read it: a tensor contiguous (a strided or expanded view is copied: kernels
    index per-head scales with stride 1), a float as a float, None.
    """
    if not is_fp8(cache.dtype):
        if scale is not None:
            raise ValueError(
                f"{name}: expected None for a {cache.dtype} {cache_name} (scales apply to float8 caches), "
                f"got {type(scale).__name__}"
            )
        return
    allowed = [(), (1,)] + ([(num_heads,)] if num_heads is not None else [])
    if num_layers is not None:
        allowed.append((num_layers, num_heads) if num_heads is not None else (num_layers,))
    shapes = "a float or an fp32 tensor of shape " + " or ".join(str(list(s)).replace(" ", "") for s in allowed)
    if scale is None:
        raise ValueError(f"{name}: expected {shapes} for the {cache.dtype} {cache_name}, got None")
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32:
            raise ValueError(f"{name}: expected dtype torch.float32, got {scale.dtype}")
        if scale.device != cache.device:
            raise ValueError(f"{name}: expected device {cache.device} (same as {cache_name}), got {scale.device}")
        if tuple(scale.shape) not in allowed:
            raise ValueError(f"{name}: expected {shapes}, got shape {list(scale.shape)}")
        # Values only where reading them costs no device sync and no graph break (not under torch.compile).
        readable = (scale.device.type == "cpu" or read_device_values) and not torch.compiler.is_compiling()
        if readable and not bool(torch.isfinite(scale).all() & (scale > 0).all()):
            raise ValueError(f"{name}: expected finite positive values, got {scale.tolist()}")
        return scale if scale.is_contiguous() else scale.contiguous()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{name}: expected {shapes}, got {type(scale).__name__}")
    return check_positive_scale(name, scale, "scale")
