"""tree_decode against the fp32 reference: trees, random tables, GQA ratios, page sizes, NaN-poisoned pools."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treeattn
from treeattn.testing import PagedTable, assert_close, check_decode, fp8_cache, poisoned_cache, random_table, tree_table


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (16, 2)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_three_level_tree(page_size, heads, dtype, device):
    table = tree_table([53, 21, 7], [1, 3, 2], page_size, spare_pages=3)
    check_decode(table, heads[0], 64, dtype, device, num_kv_heads=heads[1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims_and_odd_heads(head_dim, device):
    table = tree_table([40, 9], [1, 3], 16)
    check_decode(table, 3, head_dim, torch.float32, device, num_kv_heads=1)


def test_best_of_n_long_prompt_many_chunks(device):
    # Prompt long enough to be cut into several chunks (num_sms=1 forces few, long items; 2 forces splits).
    table = tree_table([600, 20], [1, 17], 16)
    plan = check_decode(table, 8, 64, torch.float16, device, num_kv_heads=2, plan_kw={"num_sms": 2}).plan
    assert plan.stats["work_items"] > 17


def test_no_sharing_split_kv(device):
    table = tree_table([0, 300], [1, 3], 16)
    check_decode(table, 8, 64, torch.float32, device, num_kv_heads=2, plan_kw={"num_sms": 4})


def test_identical_and_empty_queries(device):
    indptr = torch.tensor([0, 3, 3, 6, 6, 7], dtype=torch.int32)
    indices = torch.tensor([4, 1, 2, 4, 1, 2, 0], dtype=torch.int32)
    last = torch.tensor([5, 1, 5, 16, 16], dtype=torch.int32)
    table = PagedTable(indptr, indices, last, 16, 6)
    check_decode(table, 4, 64, torch.float32, device, num_kv_heads=1, sm_scale=0.3)


def test_out_and_lse_out_written_in_place(device):
    table = tree_table([30, 10], [1, 3], 16).to(device)
    q = torch.randn(3, 4, 64, device=device)
    k = poisoned_cache(table, (2, 64), torch.float32, device)
    v = poisoned_cache(table, (2, 64), torch.float32, device)
    plan = table.plan()
    out = torch.full_like(q, float("nan"))
    lse_out = torch.full((3, 4), float("nan"), device=device)
    o, lse = treeattn.tree_decode(q, k, v, plan, out=out, lse_out=lse_out, return_lse=True)
    assert o.data_ptr() == out.data_ptr() and lse.data_ptr() == lse_out.data_ptr()
    assert_close(out, table.reference(q, k, v)[0])
    # The plan (and its workspace) serves a second layer without change.
    o2 = treeattn.tree_decode(q * 0.5, k, v, plan)
    assert_close(o2, table.reference(q * 0.5, k, v)[0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_queries=st.sampled_from([1, 3, 17]),
    page_size=st.sampled_from([1, 16, 64]),
    heads=st.sampled_from([(4, 4), (8, 2), (8, 1), (3, 3)]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    hint=st.booleans(),
)
def test_random_tables(num_queries, page_size, heads, seed, dtype, hint, device):
    g = torch.Generator().manual_seed(seed)
    table = random_table(num_queries, page_size, max_pages=4 if page_size > 1 else 40, pool_pages=24, generator=g)
    hints = {} if hint else {"num_qo_heads": None, "num_kv_heads": None}  # the plan is exact either way
    check_decode(table, heads[0], 64, dtype, device, num_kv_heads=heads[1], plan_kw={"num_sms": 2, **hints},
                 seed=seed)


def _small_case(device, dtype=torch.float32):
    table = tree_table([20, 5], [1, 2], 16).to(device)
    q = torch.randn(2, 4, 64, device=device, dtype=dtype)
    k = torch.randn(table.num_pages, 16, 2, 64, device=device, dtype=dtype)
    return q, k, table.plan()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v, p: (q.half(), k, v, p),
         r"k_cache: expected dtype torch.float16 \(same as q\), got torch.float32"),
        (lambda q, k, v, p: (q, k, v.half(), p),
         r"v_cache: expected dtype torch.float32 \(same as q\), got torch.float16"),
        (lambda q, k, v, p: (q[:, :3], k, v, p), "q: expected num_qo_heads to be a multiple of num_kv_heads=2, got 3"),
        (lambda q, k, v, p: (q[:, :, :32].contiguous(), k, v, p), r"k_cache: expected head_dim 32 \(q.shape\[2\]\)"),
        (lambda q, k, v, p: (q[:1], k, v, p), r"q: expected 2 queries \(plan.num_queries\)"),
        (lambda q, k, v, p: (q, k[:1], v[:1], p), r"kv_indices: expected page ids < k_cache.shape\[0\]=1"),
        (lambda q, k, v, p: (q, k.view(-1, 8, 2, 64), v.view(-1, 8, 2, 64), p),
         r"k_cache: expected page_size 16 \(from plan\)"),
        (lambda q, k, v, p: (q, k, v[:, :, :1], p), r"v_cache: expected shape \[.*\] \(same as k_cache\)"),
        (lambda q, k, v, p: (q[0], k, v, p), r"q: expected 3 dims"),
        (lambda q, k, v, p: (q.int(), k, v, p), r"q: expected dtype float16, bfloat16 or float32, got torch.int32"),
        (lambda q, k, v, p: (q, k, v, "plan"), r"plan: expected a treeattn.TreePlan"),
    ],
)
def test_tree_decode_errors(mutate, match, device):
    q, k, plan = _small_case(device)
    args = mutate(q, k, k.clone(), plan)
    with pytest.raises(ValueError, match=match):
        treeattn.tree_decode(*args)


def test_out_argument_errors(device):
    q, k, plan = _small_case(device)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 4, 64\], dtype torch.float32"):
        treeattn.tree_decode(q, k, k, plan, out=torch.empty(2, 4, 32, device=device))
    with pytest.raises(ValueError, match=r"lse_out: expected shape \[2, 4\], dtype torch.float32"):
        treeattn.tree_decode(q, k, k, plan, lse_out=torch.empty(2, 4, device=device, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (8, 8), (32, 4)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_bf16_gpu(heads, page_size):
    table = tree_table([700, 150, 33], [1, 4, 3], page_size, spare_pages=5)
    check_decode(table, heads[0], 128, torch.bfloat16, torch.device("cuda"), num_kv_heads=heads[1],
                 sm_scale=1 / math.sqrt(128))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """tree_decode has no host sync or allocation after the first layer: a step captures and replays."""
    device = torch.device("cuda")
    table = tree_table([256, 64], [1, 8], 16).to(device)
    q = torch.randn(8, 32, 128, device=device, dtype=torch.bfloat16)
    k = poisoned_cache(table, (8, 128), torch.bfloat16, device)
    v = poisoned_cache(table, (8, 128), torch.bfloat16, device)
    plan = table.plan()
    out = torch.empty_like(q)
    treeattn.tree_decode(q, k, v, plan, out=out)  # warm-up: compile, workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        treeattn.tree_decode(q, k, v, plan, out=out)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, table.reference(q, k, v)[0])


def test_deterministic_bitwise(device):
    """Fixed merge order, no atomics: the same step gives bit-identical outputs every time."""
    table = tree_table([300, 40, 9], [1, 4, 2], 16).to(device)
    q = torch.randn(table.num_queries, 8, 64, device=device, dtype=torch.float16)
    k = poisoned_cache(table, (2, 64), torch.float16, device)
    v = poisoned_cache(table, (2, 64), torch.float16, device)
    plan = table.plan(num_sms=2)
    assert plan.stats["partial_rows"] > 0  # stage 2 merges run
    first = treeattn.tree_decode(q, k, v, plan, return_lse=True)
    again = treeattn.tree_decode(q, k, v, plan, return_lse=True)
    replanned = table.plan(num_sms=2)
    third = treeattn.tree_decode(q, k, v, replanned, return_lse=True)
    for a, b, c in zip(first, again, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_torch_compile_fullgraph(device):
    table = tree_table([40, 9], [1, 3], 16).to(device)
    q = torch.randn(3, 4, 64, device=device)
    k = poisoned_cache(table, (2, 64), torch.float32, device)
    v = poisoned_cache(table, (2, 64), torch.float32, device)
    plan = table.plan()
    compiled = torch.compile(lambda q, k, v: treeattn.tree_decode(q, k, v, plan) * 2.0, fullgraph=True, backend="eager")
    assert_close(compiled(q, k, v), 2.0 * table.reference(q, k, v)[0])


def test_opcheck_registered_op(device):
    table = tree_table([40, 9], [1, 3], 16).to(device)
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(table.num_pages, 16, 2, 64, device=device)
    plan = table.plan()
    partial_o, partial_lse = plan.workspace(4, 64)
    args = (q, k, k.clone(), plan.tensor_args(), torch.empty_like(q), torch.empty(3, 4, device=device),
            partial_o, partial_lse, 0.125, 16, plan.max_queries_per_item)
    torch.library.opcheck(torch.ops.treeattn.tree_decode_run.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---- regressions: bad input gets a clear error, NaN propagates ---------------------------------------------


def test_v_head_dim_other_than_k_head_dim_is_rejected(device):
    q, k, plan = _small_case(device)
    v = torch.randn(*k.shape[:3], 32, device=device)
    with pytest.raises(ValueError,
                       match=r"v_cache: expected shape \[\d+, 16, 2, 64\] \(same as k_cache\), got \[\d+, 16, 2, 32\]"):
        treeattn.tree_decode(q, k, v, plan)


def _shared_prefix_step(device, num_qo_heads=4, num_kv_heads=2, head_dim=64):
    """3 branches sharing a 40-token prompt (every query merges a shared and an own partial) and one
    query with empty KV."""
    tree = tree_table([40, 9], [1, 3], 16)
    indptr = torch.cat([tree.kv_indptr, tree.kv_indptr[-1:]])
    last = torch.cat([tree.kv_last_page_len, torch.tensor([1], dtype=torch.int32)])
    table = PagedTable(indptr, tree.kv_indices, last, 16, tree.num_pages).to(device)
    q = torch.randn(4, num_qo_heads, head_dim, device=device)
    k = poisoned_cache(table, (num_kv_heads, head_dim), torch.float32, device)
    v = poisoned_cache(table, (num_kv_heads, head_dim), torch.float32, device)
    return table, q, k, v, table.plan()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on the NaN
def test_nan_in_q_or_attended_k_propagates_to_merged_queries(device):
    table, q, k, v, plan = _shared_prefix_step(device)
    assert plan.stats["merge_queries"] >= 3  # the NaN goes through stage 2
    q[1, 2] = float("nan")  # query 1, head 2
    o, lse = treeattn.tree_decode(q, k, v, plan, return_lse=True)
    assert torch.isnan(o[1, 2]).all() and torch.isnan(lse[1, 2])
    assert not torch.isnan(o[[0, 2]]).any() and not torch.isnan(o[1, [0, 1, 3]]).any()
    assert (o[3] == 0).all() and torch.isneginf(lse[3]).all()  # empty KV stays 0 / -inf
    q[1, 2] = 0.0
    first_page = int(table.kv_indices[0])
    k[first_page, 0, 1] = float("nan")  # KV head 1, the prompt's first token: every branch attends it
    o, lse = treeattn.tree_decode(q, k, v, plan, return_lse=True)
    assert torch.isnan(o[:3, 2:]).all() and torch.isnan(lse[:3, 2:]).all()  # query heads 2, 3 read KV head 1
    assert not torch.isnan(o[:3, :2]).any()
    assert (o[3] == 0).all() and torch.isneginf(lse[3]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on the NaN
def test_mla_nan_in_q_propagates_to_merged_queries(device):
    table, _, _, _, plan = _shared_prefix_step(device)
    q = torch.randn(4, 16, 96, device=device)
    kv = poisoned_cache(table, (96,), torch.float32, device)
    q[0, 5, 70] = float("nan")
    o, lse = treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64, return_lse=True)
    assert torch.isnan(o[0, 5]).all() and torch.isnan(lse[0, 5])
    assert not torch.isnan(o[1:3]).any() and not torch.isnan(o[0, :5]).any()
    assert (o[3] == 0).all() and torch.isneginf(lse[3]).all()


@pytest.mark.parametrize("bad", ["0.25", float("nan"), float("inf"), 0.0, -1.0, True, torch.tensor(0.25)])
def test_sm_scale_must_be_a_finite_positive_number(bad, device):
    q, k, plan = _small_case(device)
    with pytest.raises(ValueError, match=r"sm_scale: expected a finite positive real number, got"):
        treeattn.tree_decode(q, k, k, plan, sm_scale=bad)


@pytest.mark.interpreter
def test_bf16_on_cpu_in_the_interpreter_names_q():
    q, k, plan = _small_case(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError,
                       match=r"q: expected float16 or float32 for Triton on CPU .*numpy.* got torch.bfloat16"):
        treeattn.tree_decode(q, k, k, plan)


@pytest.mark.parametrize("shape, match", [
    ((4, 16, 0, 64), r"k_cache: expected num_kv_heads and head_dim >= 1, got shape \[4, 16, 0, 64\]"),
    ((4, 16, 2, 0), r"q: expected num_qo_heads and head_dim >= 1, got shape \[2, 4, 0\]"),
])
def test_zero_kv_heads_or_head_dim_is_a_value_error(shape, match, device):
    q, _, plan = _small_case(device)
    k = torch.zeros(shape, device=device)
    if shape[3] == 0:
        q = q[..., :0]
    with pytest.raises(ValueError, match=match):
        treeattn.tree_decode(q, k, k, plan)


def test_out_that_is_not_a_tensor_is_a_value_error(device):
    q, k, plan = _small_case(device)
    with pytest.raises(ValueError, match=r"out: expected a torch.Tensor or None, got list"):
        treeattn.tree_decode(q, k, k, plan, out=[q])
    with pytest.raises(ValueError, match=r"lse_out: expected a torch.Tensor or None, got tuple"):
        treeattn.tree_decode(q, k, k, plan, lse_out=(1,))


# ---- the host path: one validation and one backend choice per (plan, layout), exact on every call ----------


def test_repeated_calls_with_new_data_and_layouts_stay_exact(device):
    table, q, k, v, plan = _shared_prefix_step(device)
    ref = lambda q, k, v: table.reference(q, k, v)[0]  # noqa: E731
    for _ in range(2):  # same layout, new data (a later layer)
        q, k, v = torch.randn_like(q), k * 1.5, v - 0.5
        assert_close(treeattn.tree_decode(q, k, v, plan), ref(q, k, v))
    wide = torch.randn(4, 8, 64, device=device)[:, ::2]  # q with other strides
    assert_close(treeattn.tree_decode(wide, k, v, plan), ref(wide, k, v))
    out = torch.empty(4, 4, 64, device=device)
    assert treeattn.tree_decode(q, k, v, plan, out=out).data_ptr() == out.data_ptr()
    assert_close(out, ref(q, k, v))
    with pytest.raises(ValueError, match=r"k_cache: expected dtype torch.float16"):
        treeattn.tree_decode(q.half(), k, v, plan)  # the same call as a cached one but for q's dtype


def test_refilled_plan_is_bounds_checked_on_every_call(device):
    table = tree_table([40, 9], [1, 3], 16)
    cap = treeattn.PlanCapacity(items=16, rows=32, partial_rows=32, merge_queries=4, nnz=16)
    plan = table.plan(capacity=cap, device=device, num_pages=None)  # no pool bound: the op's check is tested
    q = torch.randn(3, 4, 64, device=device)
    k = poisoned_cache(table.to(device), (2, 64), torch.float32, device)
    treeattn.tree_decode(q, k, k, plan)
    far = table.kv_indices.clone()
    far[-1] = k.shape[0]  # one page past the pool
    plan.update_(table.kv_indptr, far, table.kv_last_page_len)
    with pytest.raises(ValueError, match=r"kv_indices: expected page ids < k_cache.shape\[0\]"):
        treeattn.tree_decode(q, k, k, plan)


def test_cached_step_takes_each_calls_caches_and_fp8_scales(device):
    """Layers share a layout but not their caches or scales: a call served by the prepared step reads its own."""
    table, q, _, _, plan = _shared_prefix_step(device)
    g = torch.Generator().manual_seed(11)
    for per_head in (True, False, True):  # the third call has the first call's layout: served prepared
        k, k_scale = fp8_cache(table, (2, 64), torch.float8_e4m3fn, device, per_head=per_head, generator=g)
        v, v_scale = fp8_cache(table, (2, 64), torch.float8_e4m3fn, device, per_head=per_head, generator=g)
        o = treeattn.tree_decode(q, k, v, plan, k_scale=k_scale, v_scale=v_scale)
        o_ref, _ = table.reference(q, k, v, k_scale=k_scale, v_scale=v_scale)
        keep = ~table.empty_queries
        assert_close(o[keep], o_ref[keep], torch.float16)
    o = treeattn.tree_decode(q, k, v, plan, k_scale=0.5, v_scale=2.0)  # float scales are part of the layout
    o_ref, _ = table.reference(q, k, v, k_scale=0.5, v_scale=2.0)
    assert_close(o[keep], o_ref[keep], torch.float16)
