"""FP8 KV storage in Triton kernels: the saturating, round-to-nearest-even encode of the cache write, and the
dequantization scales of the decode kernels.

Reading an FP8 cache is a load and ``x.to(q's dtype)`` (exact for every finite FP8 value, in fp16, bf16 and
fp32); the stage-1 kernels fold the K scale into the softmax scale and the V scale into the output
(:func:`scale_operand`, :func:`load_scale`), so no dequantized copy of the cache ever exists. Encoding is done
by hand because ``fp32 -> fp8`` conversion differs between backends: the GPU
rounds to nearest even, the CPU interpreter truncates toward zero. :func:`round_to_fp8` rounds in fp32
arithmetic first, so the final conversion is exact on both and the stored bytes match
``treeattn.reference.quantize`` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fp8_format", "load_scale", "round_to_fp8", "scale_operand"]


def fp8_format(dtype: torch.dtype) -> dict:
    """Constexpr arguments of :func:`round_to_fp8` for an FP8 torch dtype: mantissa bits, the exponent of the
    smallest normal value and the largest finite value."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    return dict(
        FP8_MANTISSA_BITS=mantissa_bits,
        FP8_MIN_EXP=int(torch.tensor(info.smallest_normal).log2().item()),
        FP8_MAX=float(info.max),
    )


@triton.jit
def round_to_fp8(x, scale, FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr):
    """``x / scale`` (fp32, IEEE division) saturated to ``[-FP8_MAX, FP8_MAX]`` and rounded to nearest even
    onto the FP8 grid, still in fp32 (convert with ``.to(fp8 type)``: exact). NaN stays NaN."""
    y = tl.div_rn(x.to(tl.float32), scale)
    y = tl.maximum(y, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(y, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    # Spacing of the FP8 grid at y: 2^(exponent - mantissa bits), constant below the smallest normal.
    exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, FP8_MIN_EXP)
    # Adding 1.5 * 2^23 * spacing rounds y to a multiple of the spacing (fp32 addition rounds to nearest
    # even) while |y| stays far inside that binade; subtracting it back is exact.
    magic = (((exponent - FP8_MANTISSA_BITS + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rounded = (y + magic) - magic
    # A negative y that rounds to zero is -0 (as IEEE rounding gives): put y's sign bit back.
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


def scale_operand(scale, placeholder: torch.Tensor) -> tuple[torch.Tensor, int, float, bool]:
    """How a stage-1 launch takes a dequantization scale: ``(pointer, per-head stride, host factor, has_pointer)``.

    A tensor scale is read by the kernel (stride 1 for one per KV head, 0 for a single value); a Python
    float (or None: 1.0) is folded into the launch's float arguments; ``placeholder`` fills the unused pointer.
    """
    if isinstance(scale, torch.Tensor):
        return scale, (1 if scale.numel() > 1 else 0), 1.0, True
    return placeholder, 0, 1.0 if scale is None else float(scale), False


@triton.jit
def load_scale(scale_ptr, index):
    """A scale read by a kernel; one that is not finite and positive becomes NaN (the output turns NaN, never
    a plausible answer: the host checks values only where it can without a device sync)."""
    s = tl.load(scale_ptr + index)
    return tl.where((s > 0) & (s < float("inf")), s, float("nan"))
