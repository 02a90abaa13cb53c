"""The C++ planner (treeattn._planner) produces exactly the numpy planner's plan (its oracle)."""

import contextlib
import importlib
from array import array

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from treeattn import TreeKVCache
from treeattn.testing import WORKLOADS, assert_same_plan, random_table, tree_table, workload_table

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


@contextlib.contextmanager
def _planner(name):
    """plan_module._PLANNER = name inside (as TREEATTN_PLANNER=name would set it)."""
    saved, plan_module._PLANNER = plan_module._PLANNER, name
    try:
        yield
    finally:
        plan_module._PLANNER = saved


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4, 16]),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(1, 20)), max_size=25),
    picks=st.one_of(st.just("all"), st.lists(st.integers(0, 60), min_size=1, max_size=8)),
    num_tokens=st.sampled_from([1, 1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tree_entry_point_identical(page_size, ops, picks, num_tokens, seed):
    """TreeKVCache.plan through plan_tree (C++) equals the numpy walk (the same walk TreeKVCache.plan ran
    before it moved to C++, counting tokens on the table): every tensor, stat and bound."""
    cache = TreeKVCache(1, 1, 16, page_size=page_size, num_pages=4096, dtype=torch.float32, device="cpu")
    rng = np.random.default_rng(seed)
    nodes = [cache.add(int(rng.integers(0, 40)))]
    for op, pick, n in ops:  # fork, append, release or add, on a live node
        live = [x for x in nodes if x in cache.tree.live_ids()]
        node = live[pick % len(live)]
        if op == 0 or (op == 1 and cache.tree.node(node).children):
            nodes += cache.fork(node, 1 + n % 3)
        elif op == 1:
            cache.append([node], n)
        elif op == 2 and len(live) > 1:
            cache.release(node)
        else:
            nodes.append(cache.add(n))
    live = [x for x in nodes if x in cache.tree.live_ids()]
    chosen = live if picks == "all" else [live[p % len(live)] for p in picks]  # all: parents with children
    if num_tokens > 1:
        chosen = [x for x in chosen if cache.length(x) >= num_tokens] or [cache.add(num_tokens)]
    cpp = cache.plan(chosen, num_tokens, num_qo_heads=8)
    with _planner("numpy"):
        assert_same_plan(cpp, cache.plan(chosen, num_tokens, num_qo_heads=8))
    table = plan_module.plan(cpp.kv_indptr, cpp.kv_indices, cpp.kv_last_page_len, page_size=page_size,
                             num_qo_heads=8, num_kv_heads=1)
    assert cpp.stats == table.stats  # what treeattn.plan finds on the same table


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_tree_workloads_identical(name):
    """The DESIGN §4 trees as a TreeKVCache builds them: C++ = numpy, and treeattn.plan's stats on the table."""
    level_tokens, fanout = WORKLOADS[name]
    tokens = [t // 16 for t in level_tokens]  # (a sixteenth of each level keeps the numpy run short)
    cache = TreeKVCache(1, 1, 16, page_size=16, num_pages=8192, dtype=torch.float32, device="cpu")
    frontier = [cache.add(tokens[0]) for _ in range(fanout[0])]
    for t, ways in zip(tokens[1:], fanout[1:]):
        frontier = [kid for node in frontier for kid in cache.fork(node, ways)]
        cache.append(frontier, t)
    cpp = cache.plan(frontier)
    with _planner("numpy"):
        assert_same_plan(cpp, cache.plan(frontier))
    table = plan_module.plan(cpp.kv_indptr, cpp.kv_indices, cpp.kv_last_page_len, page_size=16, num_kv_heads=1)
    assert cpp.stats == table.stats


def _tree(**changes):
    """A valid tree at page size 8: a root of 20 tokens (pages 4 5 6), a child of 7 more continuing page 6 in
    place (pages 6 7) and an empty child; queries at the child's end, at the root's end (page 6 again, in
    part) and an empty one. ``changes`` break it."""
    tree = dict(parent=[-1, 0, 0], start=[0, 20, 20], end=[20, 27, 20],
                pages=[array("i", [4, 5, 6]), array("i", [6, 7]), array("i")], query_owner=[1, 0, -1],
                query_end=[27, 20, 0])
    tree.update(changes)
    return tree


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(start=[0, 20]), "tree: expected parent, start, end and pages of one length"),
        (dict(query_end=[27]), "query_end: expected one entry per query \\(3\\), got 1"),
        (dict(parent=[-1, 3, 0]), "parent: expected -1 or another node's index < 3 for node 1, got 3"),
        (dict(parent=[-1, 1, 0]), "parent: expected -1 or another node's index < 3 for node 1, got 1"),
        (dict(start=[0, 19, 20]), "start: expected 20 for node 1 \\(a root starts at 0"),
        (dict(end=[20, 27, 19]), "end: expected >= start=20 for node 2, got 19"),
        (dict(pages=[array("i", [4, 5]), array("i", [6, 7]), array("i")]), "pages: expected 3 page ids for node 0"),
        (dict(parent=[-1, 2, 1], start=[0, 20, 20], end=[20, 20, 20],
              pages=[array("i", [4, 5, 6]), array("i"), array("i")], query_owner=[0, -1, -1], query_end=[20, 0, 0]),
         "parent: expected a forest \\(every node leads to a root\\), got a cycle"),
        (dict(pages=[array("i", [4, -5, 6]), array("i", [6, 7]), array("i")]), "pages: expected page ids >= 0, got -5 in node 0"),
        (dict(query_owner=[1, 3, -1]), "query_owner: expected -1 or a node index < 3 for query 1, got 3"),
        (dict(query_end=[27, 20, 2]), "query_end: expected 0 \\(no owner\\) for query 2, got 2"),
        (dict(query_end=[20, 20, 0]), "query_end: expected start < query_end <= end of node 1 \\(20, 27\\] for query 0, got 20"),
    ],
)
def test_tree_same_errors(changes, match):
    for planner in ("auto", "numpy"):
        with _planner(planner), pytest.raises(ValueError, match=match):
            plan_module.plan_from_tree(**_tree(**changes), page_size=8, num_qo_heads=None, num_kv_heads=None,
                                       device=torch.device("cpu"))


def test_tree_valid_example_and_int32_buffers():
    """The error cases' base tree plans alike through both planners; C++ reads int32 buffers only."""
    kw = dict(page_size=8, num_qo_heads=None, num_kv_heads=None, device=torch.device("cpu"))
    cpp = plan_module.plan_from_tree(**_tree(), **kw)
    with _planner("numpy"):
        assert_same_plan(cpp, plan_module.plan_from_tree(**_tree(), **kw))
    assert cpp.kv_indices.tolist() == [4, 5, 6, 7, 4, 5, 6] and cpp.kv_last_page_len.tolist() == [3, 4, 0]
    # Pages 4, 5 and 6 in full (6 through the child; the root reads 4 of its tokens), 3 tokens of page 7.
    assert cpp.stats["unique_tokens"] == 3 * 8 + 3 and cpp.stats["naive_tokens"] == 27 + 20
    with pytest.raises(ValueError, match="pages: expected 1-D int32 buffers"):
        plan_module.plan_from_tree(**_tree(pages=[np.array([4, 5, 6]), array("i", [6, 7]), array("i")]), **kw)
