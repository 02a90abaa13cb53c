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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treeattn
from treeattn import reference
from treeattn.testing import FP8_NAN_BYTE, PagedTable, assert_close, check_decode, fp8_cache, random_table, tree_table
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
    grid = (triton.cdiv(x.numel(), 1024),)
    _encode_kernel[grid](x, scale.reshape(1), out, x.numel(), BLOCK=1024, **fp8_format(dtype))
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
    (None, r"k_scale: expected a float or an fp32 tensor of shape \[\] or \[1\] or \[2\] "
           r"for the torch.float8_e4m3fn k_cache, got None"),
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
        reference.tree_decode(q, cache, cache, *table.arrays, k_scale=bad, v_scale=scale)


def test_reference_rejects_scales_for_16_bit_caches_and_per_head_mla_scales():
    table, q, cache, scale = _gqa_step()
    half = cache.half()
    with pytest.raises(ValueError, match=r"v_scale: expected None for a torch.float16 v_cache "
                                         r"\(scales apply to float8 caches\), got Tensor"):
        reference.tree_decode(q, cache, half, *table.arrays, k_scale=scale, v_scale=scale)
    kv, kv_scale = fp8_cache(table, (40,), torch.float8_e5m2, "cpu")
    q_mla = torch.randn(table.num_queries, 3, 40, dtype=torch.float16)
    args = (q_mla, kv, *table.arrays)
    with pytest.raises(ValueError,
                       match=r"kv_scale: expected a float or an fp32 tensor of shape \[\] or \[1\], got shape \[2\]"):
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
    ptrs = table.arrays
    o_deq, lse_deq = reference.tree_decode(q, reference.dequantize(k, k_scale), reference.dequantize(v, v_scale), *ptrs)
    for v_form in (v_scale, v_scale.reshape(1), float(v_scale)):
        o, lse = reference.tree_decode(q, k, v, *ptrs, k_scale=k_scale, v_scale=v_form)
        assert torch.equal(o, o_deq) and torch.equal(lse, lse_deq)
    kv, kv_scale = fp8_cache(table, (40,), dtype, "cpu")
    q_mla = torch.randn(table.num_queries, 3, 40, dtype=torch.float16)
    o, lse = reference.mla_tree_decode(q_mla, kv, *ptrs, sm_scale=0.2, v_head_dim=32, kv_scale=kv_scale)
    kv_deq = reference.dequantize(kv, kv_scale)
    o_deq, lse_deq = reference.mla_tree_decode(q_mla, kv_deq, *ptrs, sm_scale=0.2, v_head_dim=32)
    assert torch.equal(o, o_deq) and torch.equal(lse, lse_deq)


# --- decode against the reference on the dequantized cache (fp16 q) ---------------------------------------------


# Page sizes x GQA groups, each case in one of the two formats (alternating) to keep the interpreter time small.
_TREE_CASES = [(page_size, heads) for page_size in (1, 16, 64) for heads in ((4, 4), (8, 2), (16, 2))]


@pytest.mark.parametrize("case", range(len(_TREE_CASES)),
                         ids=[f"page{p}-gqa{h[0] // h[1]}" for p, h in _TREE_CASES])
def test_gqa_three_level_tree(case, device):
    page_size, heads = _TREE_CASES[case]
    dtype = FP8_DTYPES[case % 2]
    table = tree_table([53, 21, 7], [1, 3, 2], page_size, spare_pages=3)
    check_decode(table, heads[0], 64, torch.float16, device, num_kv_heads=heads[1], cache_dtype=dtype,
                 per_head_scales=case % 3 != 0, seed=case)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_gqa_head_dims_odd_heads_chunks_split_kv_and_empty_queries(dtype, device):
    fp8 = dict(cache_dtype=dtype, per_head_scales=True)
    for head_dim in (64, 128):
        check_decode(tree_table([40, 9], [1, 3], 16), 3, head_dim, torch.float16, device, num_kv_heads=1, **fp8)
    # A prompt cut into several chunks (partial states merged in stage 2), with Python-float scales.
    plan = check_decode(tree_table([300, 20], [1, 9], 16), 8, 64, torch.float16, device, num_kv_heads=2,
                        cache_dtype=dtype, float_scales=True, plan_kw={"num_sms": 2}).plan
    assert plan.stats["partial_rows"] > 0
    check_decode(tree_table([0, 300], [1, 3], 16), 8, 64, torch.float16, device, num_kv_heads=2, plan_kw={"num_sms": 4},
                 **fp8)
    table = PagedTable(torch.tensor([0, 3, 3, 6, 6, 7], dtype=torch.int32),
                       torch.tensor([4, 1, 2, 4, 1, 2, 0], dtype=torch.int32),
                       torch.tensor([5, 1, 5, 16, 16], dtype=torch.int32), 16, 6)
    check_decode(table, 4, 64, torch.float16, device, num_kv_heads=1, cache_dtype=dtype, sm_scale=0.3)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_queries=st.sampled_from([1, 3, 9]),
    page_size=st.sampled_from([1, 16, 64]),
    heads=st.sampled_from([(4, 4), (8, 2), (8, 1), (3, 3)]),
    dtype=st.sampled_from(FP8_DTYPES),
    per_head=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gqa_random_tables(num_queries, page_size, heads, dtype, per_head, seed, device):
    g = torch.Generator().manual_seed(seed)
    table = random_table(num_queries, page_size, max_pages=4 if page_size > 1 else 24, pool_pages=24, generator=g)
    check_decode(table, heads[0], 64, torch.float16, device, num_kv_heads=heads[1], cache_dtype=dtype,
                 per_head_scales=per_head, plan_kw={"num_sms": 2}, seed=seed)


@pytest.mark.parametrize("dtype, num_heads", [(torch.float8_e4m3fn, 1), (torch.float8_e5m2, 16),
                                              (torch.float8_e4m3fn, 128)], ids=["e4m3fn-1", "e5m2-16", "e4m3fn-128"])
def test_mla_deepseek_shapes(num_heads, dtype, device):
    levels = ([45, 20, 7], [1, 3, 2]) if num_heads < 128 else ([30, 7], [1, 2])
    table = tree_table(*levels, 16, spare_pages=2)
    check_decode(table, num_heads, 576, torch.float16, device, v_head_dim=512, cache_dtype=dtype, seed=num_heads)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_mla_page_sizes_small_dims_chunks_and_empty_queries(dtype, device):
    for page_size in (1, 64):
        check_decode(tree_table([70, 9], [1, 3], page_size, spare_pages=1), 16, 80, torch.float16, device,
                     v_head_dim=64, cache_dtype=dtype, float_scales=page_size == 1)
    for (head_dim, v_head_dim), num_heads in (((288, 256), 17), ((72, 40), 63), ((64, 64), 3)):
        check_decode(tree_table([33, 17], [1, 4], 16, spare_pages=1), num_heads, head_dim, torch.float16, device,
                     v_head_dim=v_head_dim, cache_dtype=dtype)
    plan = check_decode(tree_table([300, 5], [1, 2], 16), 16, 80, torch.float16, device, v_head_dim=64,
                        cache_dtype=dtype, plan_kw={"num_sms": 4}).plan
    assert plan.stats["partial_rows"] > 0
    g = torch.Generator().manual_seed(7)
    table = random_table(9, 16, max_pages=5, pool_pages=12, empty_prob=0.25, generator=g)
    check_decode(table, 3, 80, torch.float16, device, v_head_dim=64, cache_dtype=dtype)


# --- the format's edges: every finite code, both zeros, subnormals, the largest values ----------------------------


def _edge_cache(table: PagedTable, shape_tail, dtype, device, generator):
    """Used slots hold codes drawn uniformly from every finite value of the format (so the largest values,
    subnormals and ±0 all occur); unused slots hold the NaN byte. Returns the cache and a per-tensor scale
    that maps the largest value to 1."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[torch.isfinite(codes.view(dtype).float())]
    cache = codes[torch.randint(0, codes.numel(), (table.num_pages, table.page_size, *shape_tail), generator=generator)]
    used = torch.zeros(table.num_pages * table.page_size, dtype=torch.bool)
    for i in range(table.num_queries):
        used[table.token_slots(i)] = True
    cache.view(table.num_pages * table.page_size, -1)[~used] = FP8_NAN_BYTE
    return cache.view(dtype).to(device), torch.tensor(1.0 / torch.finfo(dtype).max, device=device)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_values_at_the_format_edges(dtype, device):
    g = torch.Generator().manual_seed(3)
    table = tree_table([40, 11], [1, 3], 16, spare_pages=1).to(device)
    plan = table.plan()
    q = (torch.randn(table.num_queries, 8, 64, generator=g) * 4).to(dtype=torch.float16, device=device)
    k, scale = _edge_cache(table, (2, 64), dtype, device, g)
    v, _ = _edge_cache(table, (2, 64), dtype, device, g)
    o, lse = treeattn.tree_decode(q, k, v, plan, k_scale=scale, v_scale=scale, return_lse=True)
    o_ref, lse_ref = table.reference(q, k, v, k_scale=scale, v_scale=scale)
    assert_close(o, o_ref, torch.float16)
    assert_close(lse, lse_ref, torch.float16, "lse")
    kv, scale = _edge_cache(table, (80,), dtype, device, g)
    q = (torch.randn(table.num_queries, 3, 80, generator=g) * 4).to(dtype=torch.float16, device=device)
    o, lse = treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.2, v_head_dim=64, kv_scale=scale, return_lse=True)
    o_ref, lse_ref = table.reference(q, kv, sm_scale=0.2, v_head_dim=64, kv_scale=scale)
    assert_close(o, o_ref, torch.float16)
    assert_close(lse, lse_ref, torch.float16, "lse")


# --- ops: bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", BAD_SCALES)
def test_tree_decode_rejects_bad_k_scale(bad, match):
    table, q, cache, scale = _gqa_step()
    with pytest.raises(ValueError, match=match):
        treeattn.tree_decode(q, cache, cache, table.plan(), k_scale=bad, v_scale=scale)


def test_decode_ops_reject_bad_scales_and_caches():
    table, q, cache, scale = _gqa_step()
    plan = table.plan()
    with pytest.raises(ValueError, match=r"v_scale: expected None for a torch.float16 v_cache"):
        treeattn.tree_decode(q, cache, cache.half(), plan, k_scale=scale, v_scale=scale)
    with pytest.raises(ValueError, match=r"v_scale: expected .* for the torch.float8_e4m3fn v_cache, got None"):
        treeattn.tree_decode(q, cache, cache, plan, k_scale=scale)
    with pytest.raises(ValueError, match=r"k_cache: expected dtype float16, bfloat16, float32, float8_e4m3fn "
                                         r"or float8_e5m2, got torch.uint8"):
        treeattn.tree_decode(q, cache.view(torch.uint8), cache, plan, k_scale=scale, v_scale=scale)
    with pytest.raises(ValueError, match=r"v_cache: expected device cpu \(same as q\), got meta"):
        treeattn.tree_decode(q, cache, cache.to("meta"), plan, k_scale=scale, v_scale=scale)
    kv, kv_scale = fp8_cache(table, (40,), torch.float8_e5m2, "cpu")
    q_mla = torch.randn(table.num_queries, 3, 40, dtype=torch.float16)
    for bad, match in [
        (None, r"kv_scale: expected a float or an fp32 tensor of shape \[\] or \[1\] "
               r"for the torch.float8_e5m2 kv_cache, got None"),
        (torch.ones(3), r"kv_scale: expected .*, got shape \[3\]"),
        (float("nan"), r"kv_scale: expected a finite positive scale, got nan"),
        (torch.tensor(0.0), r"kv_scale: expected finite positive values, got 0.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            treeattn.mla_tree_decode(q_mla, kv, plan, sm_scale=0.1, v_head_dim=32, kv_scale=bad)
    with pytest.raises(ValueError, match=r"kv_scale: expected None for a torch.float16 kv_cache"):
        treeattn.mla_tree_decode(q_mla, kv.half(), plan, sm_scale=0.1, v_head_dim=32, kv_scale=kv_scale)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("which", ["k", "v"])
def test_kernel_turns_a_bad_device_scale_into_nan(which, bad, device):
    """On the GPU the host does not read scale values (no sync): stage 1 makes a bad one visible as NaN.
    (Branches without shared pages: every query is one work item, written by stage 1 directly.)"""
    table = tree_table([0, 20], [1, 2], 16).to(device)
    q = torch.randn(2, 4, 32, device=device).half()
    cache, scale = fp8_cache(table, (2, 32), torch.float8_e4m3fn, device, per_head=True)
    plan = table.plan()
    assert plan.stats["partial_rows"] == 0
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=device)
    bad_scale = scale.clone()
    bad_scale[1] = bad
    k_scale, v_scale = (bad_scale, scale) if which == "k" else (scale, bad_scale)
    treeattn.triton_kernels.gqa_decode.tree_decode(q, cache, cache, plan, out, lse, *plan.workspace(4, 32), 0.2,
                                                   k_scale, v_scale)
    assert out[:, 2:].isnan().all() and not out[:, :2].isnan().any()  # KV head 1 serves query heads 2, 3
    kv, kv_scale = fp8_cache(table, (40,), torch.float8_e4m3fn, device)
    out = torch.empty(q.shape[0], 3, 32, dtype=q.dtype, device=device)
    lse = torch.empty(q.shape[0], 3, device=device)
    q_mla = torch.randn(q.shape[0], 3, 40, device=device).half()
    treeattn.triton_kernels.mla_decode.mla_tree_decode(q_mla, kv, plan, out, lse, *plan.workspace(3, 32), 0.2,
                                                       torch.tensor(bad, device=device))
    assert out.isnan().all()


def test_registered_op_schema_and_fake_with_fp8(device):
    table, q, cache, scale = _gqa_step()
    table, q, cache, scale = table.to(device), q.to(device), cache.to(device), scale.to(device)
    plan = table.plan()
    partial_o, partial_lse = plan.workspace(4, 32)
    args = (q, cache, cache.clone(), plan.tensor_args(), torch.empty_like(q), torch.empty(q.shape[:2], device=device),
            partial_o, partial_lse, 0.125, 16, plan.max_queries_per_item, scale, None, 1.0, 0.5)
    # (torch's schema check multiplies the inputs, which it cannot do in FP8 on CPU: fake-tensor check only.)
    torch.library.opcheck(torch.ops.treeattn.tree_decode_run.default, args, test_utils=("test_faketensor",))


def test_torch_compile_fullgraph_with_fp8_cache(device):
    table, q, cache, scale = _gqa_step()
    table, q, cache, scale = table.to(device), q.to(device), cache.to(device), scale.to(device)
    plan = table.plan()
    compiled = torch.compile(lambda q, k, s: treeattn.tree_decode(q, k, k, plan, k_scale=s, v_scale=0.5) * 2.0,
                             fullgraph=True, backend="eager")
    o_ref, _ = table.reference(q, cache, cache, k_scale=scale, v_scale=0.5)
    assert_close(compiled(q, cache, scale), 2.0 * o_ref, torch.float16)


# --- TreeKVCache: FP8 pools, quantizing writes, copy on write, write -> decode round trips ----------------------


def _decode_layer(cache, layer, q, plan):
    return treeattn.tree_decode(q, **cache.layer(layer), plan=plan, return_lse=True)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_cache_write_decode_round_trip_with_copy_on_write(dtype, device):
    """A prompt ending mid-page, three branches (copy on write of the shared partial page), two steps; the pool
    holds reference.quantize of every row written (bit for bit, saturating), and decode on it matches the
    reference on the dequantized pool."""
    g = torch.Generator().manual_seed(5)
    num_layers, heads, head_dim = 2, 2, 32
    k_scale = (torch.rand(num_layers, heads, generator=g) + 0.5) / 64  # per layer and KV head
    cache = treeattn.TreeKVCache(num_layers, heads, head_dim, page_size=16, num_pages=16, dtype=dtype,
                                 device=device, k_scale=k_scale.to(device), v_scale=0.02)
    written = {layer: [] for layer in range(num_layers)}  # per layer: (k, v) rows of each write, in order

    def write(slots):
        for layer in range(num_layers):
            k = torch.randn(slots.numel(), heads, head_dim, generator=g)
            k[0, 0, :4] = torch.tensor([1e5, -1e5, 1e-12, 0.0])  # ±inf in fp16 (saturate), underflow, zero
            v = torch.randn(slots.numel(), heads, head_dim, generator=g)
            k, v = k.half().to(device), v.half().to(device)
            cache.write(layer, slots, k, v)
            written[layer].append((k.float(), v.float()))

    root = cache.add(21)
    write(cache.slots(root))
    leaves = cache.fork(root, 3)
    for _ in range(2):
        write(cache.append(leaves))
    assert cache.stats()["pages_copied"] > 0 and cache.stats()["bytes_per_page"] == 2 * 2 * 16 * heads * head_dim
    plan = cache.plan(leaves)
    q = torch.randn(3, 4, head_dim, generator=g).half().to(device)
    for layer in range(num_layers):
        k_cache, v_cache, ks, vs = cache.layer(layer).values()
        assert ks.shape == (heads,) and torch.equal(ks.cpu(), k_scale[layer]) and (vs == 0.02).all()
        (root_k, root_v), *steps = written[layer]
        for j, leaf in enumerate(leaves):  # each path holds the quantized rows written along it (copies included)
            path = cache.path_slots(leaf)
            k_rows = torch.cat([root_k, *(k[j:j + 1] for k, _ in steps)])
            v_rows = torch.cat([root_v, *(v[j:j + 1] for _, v in steps)])
            assert torch.equal(k_cache.flatten(0, 1)[path].view(torch.uint8),
                               reference.quantize(k_rows, ks, dtype).view(torch.uint8))
            assert torch.equal(v_cache.flatten(0, 1)[path].view(torch.uint8),
                               reference.quantize(v_rows, vs, dtype).view(torch.uint8))
        top = torch.finfo(dtype).max
        assert k_cache.flatten(0, 1)[cache.slots(root)[0], 0, :2].float().tolist() == [top, -top]  # saturated
        o, lse = _decode_layer(cache, layer, q, plan)
        table = (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)
        o_ref, lse_ref = reference.tree_decode(q, k_cache, v_cache, *table, k_scale=ks, v_scale=vs)
        assert_close(o, o_ref, torch.float16)
        assert_close(lse, lse_ref, torch.float16, what="lse")


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=FP8_IDS)
def test_mla_cache_write_decode_round_trip(dtype, device):
    g = torch.Generator().manual_seed(6)
    cache = treeattn.TreeKVCache.mla(2, kv_lora_rank=64, rope_dim=16, page_size=16, num_pages=8, dtype=dtype,
                                     device=device, kv_scale=torch.tensor([0.01, 0.03], device=device))
    root = cache.add(19)
    leaves = cache.fork(root, 2)
    for layer in range(2):
        cache.write(layer, cache.slots(root), torch.randn(19, 80, generator=g).to(device))
    slots = cache.append(leaves)
    for layer in range(2):
        cache.write(layer, slots, torch.randn(2, 80, generator=g).half().to(device))
    plan = cache.plan(leaves, num_qo_heads=3)
    q = torch.randn(2, 3, 80, generator=g).half().to(device)
    for layer in range(2):
        kv, kv_scale = cache.layer(layer).values()
        assert kv_scale.shape == (1,) and kv_scale.item() == pytest.approx([0.01, 0.03][layer])
        o = treeattn.mla_tree_decode(q, **cache.layer(layer), plan=plan, sm_scale=0.15, v_head_dim=64)
        o_ref, _ = reference.mla_tree_decode(q, kv, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len,
                                             sm_scale=0.15, v_head_dim=64, kv_scale=kv_scale)
        assert_close(o, o_ref, torch.float16)


def test_cache_fp8_write_backends_agree(device):
    """The Triton write (encode in the kernel) and the reference write store the same bytes."""
    g = torch.Generator().manual_seed(8)
    pools = []
    for backend in ("triton", "reference"):
        cache = treeattn.TreeKVCache(1, 3, 24, page_size=16, num_pages=4, dtype=torch.float8_e4m3fn, device=device,
                                     k_scale=torch.tensor([0.5, 0.01, 3.0], device=device), v_scale=0.25)
        slots = cache.slots(cache.add(40))
        k = (torch.randn(40, 3, 24, generator=g.manual_seed(1)) * 50).to(device)
        v = (torch.randn(40, 3, 24, generator=g) * 50).half().to(device)
        padded = torch.cat([slots, torch.tensor([-1], device=device)])  # a negative slot is skipped
        with treeattn._dispatch.force(backend):
            cache.write(0, padded, torch.cat([k, k[:1]]), torch.cat([v, v[:1]]))
        layer = cache.layer(0)
        pools.append(torch.stack([c.flatten(0, 1)[slots] for c in (layer.k_cache, layer.v_cache)]).view(torch.uint8))
    assert torch.equal(pools[0], pools[1])


def test_cache_fp8_argument_errors():
    make = lambda **kw: treeattn.TreeKVCache(2, 3, 16, num_pages=4, device="cpu", **kw)  # noqa: E731
    fp8 = torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"k_scale: expected a float or an fp32 tensor of shape "
                                         r"\[\] or \[1\] or \[3\] or \[2,3\] "
                                         r"for the torch.float8_e4m3fn cache, got None"):
        make(dtype=fp8, v_scale=1.0)
    with pytest.raises(ValueError, match=r"v_scale: expected .*, got shape \[3, 3\]"):
        make(dtype=fp8, k_scale=1.0, v_scale=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"k_scale: expected finite positive values"):
        make(dtype=fp8, k_scale=torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0]]), v_scale=1.0)
    with pytest.raises(ValueError, match=r"k_scale: expected None for a torch.bfloat16 cache"):
        make(k_scale=1.0)
    with pytest.raises(ValueError, match=r"kv_scale: expected .* or \[5\] for the torch.float8_e5m2 cache, got None"):
        treeattn.TreeKVCache.mla(5, num_pages=2, dtype=torch.float8_e5m2, device="cpu")
    cache = make(dtype=fp8, k_scale=1.0, v_scale=1.0)
    slots = cache.slots(cache.add(3))
    rows = torch.randn(3, 3, 16)
    with pytest.raises(ValueError, match=r"k: expected dtype float16, bfloat16 or float32, got torch.float8_e4m3fn"):
        cache.write(0, slots, rows.to(fp8), rows)
    with pytest.raises(ValueError, match=r"v: expected shape \[3, 3, 16\]"):
        cache.write(0, slots, rows, rows[:, :2])
