"""FP8 KV caches (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``): the reference's dequantized semantics, the
cache encode (saturating, round to nearest even) bit for bit against the reference, scale validation, and
decode against the reference on the dequantized cache.

Interpreter facts these tests rely on (CPU, ``TRITON_INTERPRET=1``): every finite FP8 value loads and converts
to fp16/fp32 exactly; the interpreter has no FP8 NaN or e5m2 infinity (the NaN byte loads as ±480 in e4m3fn,
e5m2's specials as large finite values), so a stray read of a NaN-poisoned slot shows up as a large error, not
as NaN; its fp32 -> fp8 conversion truncates, which the encode sidesteps by rounding in fp32 first.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import treeattn
from treeattn import reference
from treeattn.testing import FP8_NAN_BYTE, fp8_cache, tree_table
from treeattn.triton_kernels.fp8 import fp8_format, round_to_fp8

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3fn", "e5m2"]


def _all_finite_codes(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the format (both zeros, all subnormals, the largest values), as fp32."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return values[torch.isfinite(values)]


# --- reference: quantize / dequantize --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_quantize_saturates_rounds_to_nearest_and_keeps_nan(dtype):
    info = torch.finfo(dtype)
    scale = 0.25
    codes = _all_finite_codes(dtype)
    # Every finite code times the scale encodes back to itself (zeros keep their sign).
    back = reference.quantize(codes * scale, scale, dtype)
    assert torch.equal(back.view(torch.uint8), codes.to(dtype).view(torch.uint8))
    # Beyond the range saturates to the largest finite value, infinities included; NaN stays NaN.
    edge = torch.tensor([info.max * 4, -info.max * 1.01, float("inf"), float("-inf"), float("nan")]) * scale
    q = reference.quantize(edge, scale, dtype).float()
    assert q[:4].tolist() == [info.max, -info.max, info.max, -info.max] and q[4].isnan()
    # Round to nearest, ties to even: the midpoint between two neighbouring codes goes to the even one.
    pos = codes[codes > 0].sort().values
    lo, hi = pos[:-1], pos[1:]
    mid = reference.quantize((lo + hi) / 2 * scale, scale, dtype).float()
    lo_even = (lo.to(dtype).view(torch.uint8) % 2) == 0
    assert torch.equal(mid, torch.where(lo_even, lo, hi))
    above = reference.quantize((lo + (hi - lo) * 0.75) * scale, scale, dtype).float()
    assert torch.equal(above, hi)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_dequantize_per_head_scale_multiplies_each_kv_head(dtype):
    cache = torch.randn(3, 4, 5, 8).to(dtype)
    scale = torch.tensor([0.5, 2.0, 1.0, 0.125, 8.0])
    values = reference.dequantize(cache, scale)
    for h in range(5):
        assert torch.equal(values[:, :, h], cache[:, :, h].float() * scale[h])
    assert torch.equal(reference.dequantize(cache, 3.0), cache.float() * 3.0)


# --- the kernels' encode, bit for bit against the reference ----------------------------------------------------


@triton.jit
def _encode_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr,
                   FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    y = round_to_fp8(x, tl.load(scale_ptr), FP8_MANTISSA_BITS, FP8_MIN_EXP, FP8_MAX)
    tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_kernel_encode_matches_reference_bit_for_bit(dtype, src_dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    codes = _all_finite_codes(dtype)
    pos = codes[codes > 0].sort().values
    midpoints = (pos[:-1] + pos[1:]) / 2
    scale = torch.rand((), generator=g) * 3 + 0.1
    x = torch.cat([
        torch.randn(4000, generator=g) * torch.logspace(-12, 6, 4000),  # subnormal to saturated
        codes * scale, midpoints * scale, -midpoints * scale,  # exact codes and exact ties (after / scale)
        torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e30]),
    ]).to(src_dtype)
    out = torch.empty(x.numel(), dtype=dtype)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, scale.reshape(1), out, x.numel(), BLOCK=1024, **fp8_format(dtype))
    expected = reference.quantize(x, scale, dtype)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


# --- the test toolkit's FP8 cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_fp8_cache_poisons_unused_slots_and_uses_the_range(dtype, per_head):
    table = tree_table([21, 5], [1, 3], 16, spare_pages=2)
    cache, scale = fp8_cache(table, (3, 16), dtype, "cpu", per_head=per_head)
    assert cache.dtype == dtype and cache.shape == (table.num_pages, 16, 3, 16)
    assert scale.dtype == torch.float32 and scale.shape == ((3,) if per_head else ())
    used = torch.zeros(table.num_pages * 16, dtype=torch.bool)
    for i in range(table.num_queries):
        used[table.token_slots(i)] = True
    flat = cache.view(torch.uint8).view(table.num_pages * 16, -1)
    assert (flat[~used] == FP8_NAN_BYTE).all() and cache.float().view(-1, 48)[~used].isnan().all()
    values = cache.float().view(-1, 3, 16)[used]
    assert torch.isfinite(values).all()
    peak = values.abs().amax(dim=(0, 2)) if per_head else values.abs().amax()
    assert (peak == torch.finfo(dtype).max).all()


# --- scale validation (reference and ops share it) --------------------------------------------------------------


def _gqa_step(dtype=torch.float8_e4m3fn, num_kv_heads=2):
    table = tree_table([20, 5], [1, 2], 16)
    q = torch.randn(table.num_queries, 4, 32, dtype=torch.float16)
    cache, scale = fp8_cache(table, (num_kv_heads, 32), dtype, "cpu", per_head=True)
    return table, q, cache, scale


BAD_SCALES = [
    (None, r"k_scale: expected a float or an fp32 tensor of shape \[\] or \[1\] or \[2\] for the torch.float8_e4m3fn k_cache, got None"),
    (torch.ones(3), r"k_scale: expected .* or \[2\], got shape \[3\]"),
    (torch.ones(2, 1), r"k_scale: expected .* or \[2\], got shape \[2, 1\]"),
    (torch.ones(2, dtype=torch.float16), r"k_scale: expected dtype torch.float32, got torch.float16"),
    (torch.ones(2, device="meta"), r"k_scale: expected device cpu \(same as k_cache\), got meta"),
    (torch.tensor([1.0, float("nan")]), r"k_scale: expected finite positive values, got \[1.0, nan\]"),
    (torch.tensor([1.0, 0.0]), r"k_scale: expected finite positive values"),
    (torch.tensor(-2.0), r"k_scale: expected finite positive values"),
    (float("inf"), r"k_scale: expected a finite positive scale, got inf"),
    (0.0, r"k_scale: expected a finite positive scale, got 0.0"),
    (-1, r"k_scale: expected a finite positive scale, got -1"),
    (True, r"k_scale: expected .*, got bool"),
    ("1.0", r"k_scale: expected .*, got str"),
]


@pytest.mark.parametrize("bad, match", BAD_SCALES)
def test_reference_rejects_bad_k_scale(bad, match):
    table, q, cache, scale = _gqa_step()
    with pytest.raises(ValueError, match=match):
        reference.tree_decode(q, cache, cache, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                              k_scale=bad, v_scale=scale)


def test_reference_rejects_scales_for_16_bit_caches_and_per_head_mla_scales():
    table, q, cache, scale = _gqa_step()
    half = cache.half()
    with pytest.raises(ValueError, match=r"v_scale: expected None for a torch.float16 v_cache \(scales apply to float8 caches\), got Tensor"):
        reference.tree_decode(q, cache, half, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                              k_scale=scale, v_scale=scale)
    kv, kv_scale = fp8_cache(table, (40,), torch.float8_e5m2, "cpu")
    q_mla = torch.randn(table.num_queries, 3, 40, dtype=torch.float16)
    args = (q_mla, kv, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    with pytest.raises(ValueError, match=r"kv_scale: expected a float or an fp32 tensor of shape \[\] or \[1\], got shape \[2\]"):
        reference.mla_tree_decode(*args, sm_scale=0.1, v_head_dim=32, kv_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"kv_scale: expected .* for the torch.float8_e5m2 kv_cache, got None"):
        reference.mla_tree_decode(*args, sm_scale=0.1, v_head_dim=32)
    with pytest.raises(ValueError, match=r"kv_scale: expected None for a torch.float16 kv_cache"):
        reference.mla_tree_decode(q_mla, kv.half(), *args[2:], sm_scale=0.1, v_head_dim=32, kv_scale=kv_scale)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_reference_attends_the_dequantized_cache(dtype):
    """Scales of every accepted form give the attention of ``cache * scale`` (per head for GQA)."""
    table, q, k, k_scale = _gqa_step(dtype)
    v, v_scale = fp8_cache(table, (2, 32), dtype, "cpu")
    ptrs = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    o_deq, lse_deq = reference.tree_decode(q, reference.dequantize(k, k_scale), reference.dequantize(v, v_scale), *ptrs)
    for v_form in (v_scale, v_scale.reshape(1), float(v_scale)):
        o, lse = reference.tree_decode(q, k, v, *ptrs, k_scale=k_scale, v_scale=v_form)
        assert torch.equal(o, o_deq) and torch.equal(lse, lse_deq)
    kv, kv_scale = fp8_cache(table, (40,), dtype, "cpu")
    q_mla = torch.randn(table.num_queries, 3, 40, dtype=torch.float16)
    o, lse = reference.mla_tree_decode(q_mla, kv, *ptrs, sm_scale=0.2, v_head_dim=32, kv_scale=kv_scale)
    o_deq, lse_deq = reference.mla_tree_decode(q_mla, reference.dequantize(kv, kv_scale), *ptrs, sm_scale=0.2, v_head_dim=32)
    assert torch.equal(o, o_deq) and torch.equal(lse, lse_deq)
