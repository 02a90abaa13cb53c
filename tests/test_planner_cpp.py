"""The C++ planner (treeattn._planner) produces exactly the numpy planner's plan (its oracle)."""

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from treeattn.testing import random_table, tree_table, workload_table

plan_module = importlib.import_module("treeattn.plan")  # the module; treeattn.plan is the function

pytestmark = pytest.mark.skipif(plan_module._planner is None, reason="treeattn._planner (C++) not built")


def _both(table, *, num_pages=-1, share=True, group=4, kv_heads=8, num_sms=132):
    args = (table.kv_indptr.numpy(), table.kv_indices.numpy(), table.kv_last_page_len.numpy(), table.page_size,
            num_pages, share, group, kv_heads, num_sms)
    return plan_module._plan_table_cpp(*args), plan_module._plan_table_numpy(*args)


def _assert_same(cpp, ref):
    packed, sizes, stats, max_item_tokens, max_page = cpp
    assert np.array_equal(packed, ref[0]) and packed.dtype == np.int32
    assert list(sizes) == list(ref[1])
    assert stats == ref[2]
    assert (max_item_tokens, max_page) == (ref[3], ref[4])


@settings(max_examples=150, deadline=None)
@given(
    num_queries=st.integers(0, 40),
    page_size=st.sampled_from([1, 2, 16]),
    max_pages=st.sampled_from([1, 4, 30]),
    pool=st.sampled_from([4, 64]),
    share=st.booleans(),
    group=st.sampled_from([1, 4, 16]),
    num_sms=st.sampled_from([1, 132]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_tables_identical(num_queries, page_size, max_pages, pool, share, group, num_sms, seed):
    g = torch.Generator().manual_seed(seed)
    table = random_table(num_queries, page_size, max_pages=max_pages, pool_pages=pool, generator=g)
    _assert_same(*_both(table, share=share, group=group, num_sms=num_sms))


@pytest.mark.parametrize("name", ["bestofN_P4k_N64_S256", "tree_2k_4x1k_4x512_4x128", "hydragen_P8k_N256_S64"])
def test_workloads_identical(name):
    _assert_same(*_both(workload_table(name)))


def test_partial_last_pages_shared_and_not():
    # Same page as a full middle page for one query and a partial last page for another.
    table = tree_table([40, 7], [1, 3], 16)
    _assert_same(*_both(table))


@pytest.mark.parametrize(
    "indptr, indices, last, num_pages, match",
    [
        ([0, 2, 1, 2], [0, 1], [3, 3, 3], -1, "kv_indptr: expected non-decreasing values, got kv_indptr\\[1\\]=2 > kv_indptr\\[2\\]=1"),
        ([0, 2, 3], [0, 1], [3, 3], -1, "kv_indptr: expected kv_indptr\\[-1\\] == len\\(kv_indices\\) == 2, got 3"),
        ([0, 2], [0, 1], [17], -1, "kv_last_page_len: expected 1..page_size=16 for query 0 \\(it has pages\\), got 17"),
        ([0, 2], [0, 9], [3], 9, "kv_indices: expected page ids < num_pages=9, got 9"),
        ([0, 2], [0, -4], [3], -1, "kv_indices: expected page ids >= 0, got -4"),
    ],
)
def test_same_errors(indptr, indices, last, num_pages, match):
    args = [np.asarray(indptr, np.int32), np.asarray(indices, np.int32), np.asarray(last, np.int32), 16, num_pages,
            True, 4, 8, 132]
    for planner in (plan_module._plan_table_cpp, plan_module._plan_table_numpy):
        with pytest.raises(ValueError, match=match):
            planner(*args)


def test_edges_entry_point_identical():
    """plan_from_edges (TreeKVCache.plan's path) gives the same plan through C++ as through numpy."""
    table = workload_table("tree_2k_4x1k_4x512_4x128")
    numpy_plan = _both(table)[1]
    indptr = table.kv_indptr.numpy().astype(np.int64)
    indices = table.kv_indices.numpy()
    used = np.full(indices.shape[0], table.page_size, dtype=np.int64)
    lengths = np.diff(indptr)
    used[indptr[1:][lengths > 0] - 1] = table.kv_last_page_len.numpy()[lengths > 0]
    keys = indices.astype(np.int64) * (table.page_size + 1) + used
    order = plan_module._lexicographic_order(keys, indptr, table.num_queries)
    starts = indptr[:-1][order]
    lcp = plan_module._neighbour_lcp(keys, starts, lengths[order])
    d0, d1, lo, hi = plan_module._trie_edges(lcp, lengths[order])
    kw = dict(order=order, edge_lo=lo, edge_hi=hi, edge_depth=d0, edge_pages=d1 - d0, edge_first_page=starts[lo] + d0,
              edge_tail=table.page_size - used[starts[lo] + d1 - 1], kv_indptr=table.kv_indptr,
              kv_indices=table.kv_indices, kv_last_page_len=table.kv_last_page_len, indices=indices, used=used,
              page_size=table.page_size, num_qo_heads=None, num_kv_heads=None, device=torch.device("cpu"))
    cpp = plan_module.plan_from_edges(**kw)
    saved, plan_module._PLANNER = plan_module._PLANNER, "numpy"
    try:
        ref = plan_module.plan_from_edges(**kw)
    finally:
        plan_module._PLANNER = saved
    for name in plan_module.PLAN_TENSOR_FIELDS:
        assert torch.equal(getattr(cpp, name), getattr(ref, name)), name
    assert cpp.stats == ref.stats
    assert np.array_equal(np.concatenate([getattr(ref, n).numpy() for n in plan_module.PLAN_TENSOR_FIELDS[3:]]),
                          numpy_plan[0])
