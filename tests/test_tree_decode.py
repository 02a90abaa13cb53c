"""tree_decode against the fp32 reference: trees, random tables, GQA ratios, page sizes, NaN-poisoned pools."""

import math

import pytest
import torch
from conftest import TOLERANCE
from hypothesis import HealthCheck, given, settings, strategies as st

import treeattn
from treeattn.testing import poisoned_cache, random_table, relative_error, tree_table


def _run_and_check(table, num_qo_heads, num_kv_heads, head_dim, dtype, device, *, sm_scale=None, plan_kw=None):
    table = table.to(device)
    q = torch.randn(table.num_queries, num_qo_heads, head_dim, device=device).to(dtype)
    k_cache = poisoned_cache(table, (num_kv_heads, head_dim), dtype, device)
    v_cache = poisoned_cache(table, (num_kv_heads, head_dim), dtype, device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=table.page_size,
                         **(plan_kw or {}))
    o, lse = treeattn.tree_decode(q, k_cache, v_cache, plan, sm_scale=sm_scale, return_lse=True)
    o_ref, lse_ref = treeattn.reference.tree_decode(
        q, k_cache, v_cache, table.kv_indptr, table.kv_indices, table.kv_last_page_len, sm_scale=sm_scale
    )
    assert o.dtype == dtype and o.shape == (table.num_queries, num_qo_heads, head_dim)
    assert lse.dtype == torch.float32 and lse.shape == (table.num_queries, num_qo_heads)
    assert not torch.isnan(o).any(), "a NaN-poisoned slot was read"
    empty = (table.kv_indptr[1:] == table.kv_indptr[:-1]).cpu()
    assert (o[empty.to(o.device)] == 0).all() and torch.isneginf(lse[empty.to(lse.device)]).all()
    if (~empty).any():
        keep = (~empty).to(device)
        assert relative_error(o[keep], o_ref[keep]) < TOLERANCE[dtype]
        assert relative_error(lse[keep], lse_ref[keep]) < 1e-5
    return plan


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (16, 2)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_three_level_tree(page_size, heads, dtype, device):
    table = tree_table([53, 21, 7], [1, 3, 2], page_size, spare_pages=3)
    _run_and_check(table, heads[0], heads[1], 64, dtype, device)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims_and_odd_heads(head_dim, device):
    table = tree_table([40, 9], [1, 3], 16)
    _run_and_check(table, 3, 1, head_dim, torch.float32, device)


def test_best_of_n_long_prompt_many_chunks(device):
    # Prompt long enough to be cut into several chunks (num_sms=1 forces few, long items; 2 forces splits).
    table = tree_table([600, 20], [1, 17], 16)
    plan = _run_and_check(table, 8, 2, 64, torch.float16, device, plan_kw={"num_sms": 2, "num_kv_heads": 2})
    assert plan.stats["work_items"] > 17


def test_no_sharing_split_kv(device):
    table = tree_table([0, 300], [1, 3], 16)
    _run_and_check(table, 8, 2, 64, torch.float32, device, plan_kw={"num_sms": 4})


def test_identical_and_empty_queries(device):
    indptr = torch.tensor([0, 3, 3, 6, 6, 7], dtype=torch.int32)
    indices = torch.tensor([4, 1, 2, 4, 1, 2, 0], dtype=torch.int32)
    last = torch.tensor([5, 1, 5, 16, 16], dtype=torch.int32)
    from treeattn.testing import PagedTable

    table = PagedTable(indptr, indices, last, 16, 6)
    _run_and_check(table, 4, 1, 64, torch.float32, device, sm_scale=0.3)


def test_out_and_lse_out_written_in_place(device):
    table = tree_table([30, 10], [1, 3], 16).to(device)
    q = torch.randn(3, 4, 64, device=device)
    k = poisoned_cache(table, (2, 64), torch.float32, device)
    v = poisoned_cache(table, (2, 64), torch.float32, device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16)
    out = torch.full_like(q, float("nan"))
    lse_out = torch.full((3, 4), float("nan"), device=device)
    o, lse = treeattn.tree_decode(q, k, v, plan, out=out, lse_out=lse_out, return_lse=True)
    assert o.data_ptr() == out.data_ptr() and lse.data_ptr() == lse_out.data_ptr()
    o_ref, _ = treeattn.reference.tree_decode(q, k, v, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert relative_error(out, o_ref) < 1e-5
    # The plan (and its workspace) serves a second layer without change.
    o2 = treeattn.tree_decode(q * 0.5, k, v, plan)
    o2_ref, _ = treeattn.reference.tree_decode(q * 0.5, k, v, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert relative_error(o2, o2_ref) < 1e-5


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_queries=st.sampled_from([1, 3, 17]),
    page_size=st.sampled_from([1, 16, 64]),
    heads=st.sampled_from([(4, 4), (8, 2), (8, 1), (3, 3)]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_random_tables(num_queries, page_size, heads, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    table = random_table(num_queries, page_size, max_pages=4 if page_size > 1 else 40, pool_pages=24, generator=g)
    _run_and_check(table, heads[0], heads[1], 64, dtype, device, plan_kw={"num_sms": 2})


def _small_case(device, dtype=torch.float32):
    table = tree_table([20, 5], [1, 2], 16).to(device)
    q = torch.randn(2, 4, 64, device=device, dtype=dtype)
    k = torch.randn(table.num_pages, 16, 2, 64, device=device, dtype=dtype)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16)
    return q, k, plan


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v, p: (q.half(), k, v, p), r"k_cache: expected dtype torch.float16 \(same as q\), got torch.float32"),
        (lambda q, k, v, p: (q, k, v.half(), p), r"v_cache: expected dtype torch.float32 \(same as q\), got torch.float16"),
        (lambda q, k, v, p: (q[:, :3], k, v, p), "q: expected num_qo_heads to be a multiple of num_kv_heads=2, got 3"),
        (lambda q, k, v, p: (q[:, :, :32].contiguous(), k, v, p), r"k_cache: expected head_dim 32 \(q.shape\[2\]\)"),
        (lambda q, k, v, p: (q[:1], k, v, p), r"q: expected 2 queries \(plan.num_queries\)"),
        (lambda q, k, v, p: (q, k[:1], v[:1], p), r"kv_indices: expected page ids < k_cache.shape\[0\]=1"),
        (lambda q, k, v, p: (q, k.view(-1, 8, 2, 64), v.view(-1, 8, 2, 64), p), r"k_cache: expected page_size 16 \(from plan\)"),
        (lambda q, k, v, p: (q, k, v[:, :, :1], p), r"v_cache: expected shape \[.*\] like k_cache"),
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
    _run_and_check(table, heads[0], heads[1], 128, torch.bfloat16, torch.device("cuda"), sm_scale=1 / math.sqrt(128))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """tree_decode has no host sync or allocation after the first layer: a step captures and replays."""
    device = torch.device("cuda")
    table = tree_table([256, 64], [1, 8], 16).to(device)
    q = torch.randn(8, 32, 128, device=device, dtype=torch.bfloat16)
    k = poisoned_cache(table, (8, 128), torch.bfloat16, device)
    v = poisoned_cache(table, (8, 128), torch.bfloat16, device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16)
    out = torch.empty_like(q)
    treeattn.tree_decode(q, k, v, plan, out=out)  # warm-up: compile, workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        treeattn.tree_decode(q, k, v, plan, out=out)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    o_ref, _ = treeattn.reference.tree_decode(q, k, v, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert relative_error(out, o_ref) < TOLERANCE[torch.bfloat16]


def test_deterministic_bitwise(device):
    """Fixed merge order, no atomics: the same step gives bit-identical outputs every time."""
    table = tree_table([300, 40, 9], [1, 4, 2], 16).to(device)
    q = torch.randn(table.num_queries, 8, 64, device=device, dtype=torch.float16)
    k = poisoned_cache(table, (2, 64), torch.float16, device)
    v = poisoned_cache(table, (2, 64), torch.float16, device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16, num_sms=2)
    assert plan.stats["partial_rows"] > 0  # stage 2 merges run
    first = treeattn.tree_decode(q, k, v, plan, return_lse=True)
    again = treeattn.tree_decode(q, k, v, plan, return_lse=True)
    replanned = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16, num_sms=2)
    third = treeattn.tree_decode(q, k, v, replanned, return_lse=True)
    for a, b, c in zip(first, again, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_torch_compile_fullgraph(device):
    table = tree_table([40, 9], [1, 3], 16).to(device)
    q = torch.randn(3, 4, 64, device=device)
    k = poisoned_cache(table, (2, 64), torch.float32, device)
    v = poisoned_cache(table, (2, 64), torch.float32, device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16)
    compiled = torch.compile(lambda q, k, v: treeattn.tree_decode(q, k, v, plan) * 2.0, fullgraph=True, backend="eager")
    o_ref, _ = treeattn.reference.tree_decode(q, k, v, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert relative_error(compiled(q, k, v), 2.0 * o_ref) < 1e-5


def test_opcheck_registered_op(device):
    table = tree_table([40, 9], [1, 3], 16).to(device)
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(table.num_pages, 16, 2, 64, device=device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16)
    partial_o, partial_lse = plan.workspace(4, 64)
    args = (q, k, k.clone(), plan.tensor_args(), torch.empty_like(q), torch.empty(3, 4, device=device),
            partial_o, partial_lse, 0.125, 16, plan.max_queries_per_item)
    torch.library.opcheck(torch.ops.treeattn.tree_decode_run.default, args,
                          test_utils=("test_schema", "test_faketensor"))
