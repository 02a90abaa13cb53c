"""The planner against a brute-force oracle (tests/planner_oracle.py): exact coverage of every query's KV in
root→leaf merge order, consistent partial rows and merge pointers, and stats equal to independent counts;
through both entry points (treeattn.plan over a table, plan_from_tree over a known tree); errors."""

from array import array

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_oracle import check_tree_plan, random_forest, table_of_tree

import treeattn
from treeattn import _planner
from treeattn.plan import plan_from_tree
from treeattn.testing import WORKLOADS, random_table, tree_table, workload_table


def _check(table, **kw):
    """Plans ``table`` and checks the plan against the oracle."""
    plan = table.plan(**kw)
    check_tree_plan(plan, table.arrays, table.page_size, share_prefixes=kw.get("share_prefixes", True))
    return plan


def _shuffled_ids(table, rng, high=2**31 - 1):
    """The same table with its page ids mapped to distinct random ids below ``high`` (sparse ids)."""
    ids = torch.unique(table.kv_indices)
    new = torch.from_numpy(rng.choice(high, size=ids.numel(), replace=False).astype(np.int32))
    mapping = dict(zip(ids.tolist(), new.tolist()))
    table.kv_indices = torch.tensor([mapping[p] for p in table.kv_indices.tolist()], dtype=torch.int32)
    table.num_pages = high
    return table


@settings(max_examples=60, deadline=None)
@given(
    num_queries=st.integers(0, 24),
    page_size=st.sampled_from([1, 16, 64]),
    max_pages=st.sampled_from([1, 4, 12]),
    pool=st.sampled_from([3, 16, 64]),
    heads=st.sampled_from([(None, None), (32, 8), (8, 8), (16, 1), (7, 1), (1, 4)]),
    num_sms=st.sampled_from([1, 3, 132]),
    share_prefixes=st.booleans(),
    sparse_ids=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_tables_match_the_oracle(num_queries, page_size, max_pages, pool, heads, num_sms, share_prefixes,
                                        sparse_ids, seed):
    table = random_table(num_queries, page_size, max_pages=max_pages, pool_pages=pool,
                         generator=torch.Generator().manual_seed(seed))
    if sparse_ids:
        table = _shuffled_ids(table, np.random.default_rng(seed))
    _check(table, num_qo_heads=heads[0], num_kv_heads=heads[1], num_sms=num_sms, share_prefixes=share_prefixes)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_tree_tables_match_the_oracle(page_size):
    _check(tree_table([100, 37, 9], [1, 3, 4], page_size, spare_pages=2))
    _check(tree_table([40, 7], [1, 3], 16))  # a page full in the middle for one query, partial last for another


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_match_the_oracle(name):
    table = workload_table(name, scale=1 / 16)
    _check(table, num_qo_heads=32, num_kv_heads=8)
    _check(table, share_prefixes=False)


def test_best_of_n_reads_prefix_once_per_block():
    table = tree_table([4096, 256], [1, 64], 16)
    plan = _check(table, num_qo_heads=32, num_kv_heads=8)
    # 64 queries x group 4 rows -> blocks of target_rows_per_item / 4 = 16 queries; each reads the prompt once.
    block = _planner.SIZING["target_rows_per_item"] // 4
    assert plan.stats["planned_tokens"] == (64 // block) * 4096 + 64 * 256


def test_no_sharing_is_split_kv_decode():
    plan = _check(tree_table([0, 700], [1, 5], 16))
    assert plan.stats["planned_tokens"] == plan.stats["naive_tokens"] == 5 * 700
    assert plan.stats["max_queries_per_item"] == 1


def test_identical_and_empty_queries():
    indptr = torch.tensor([0, 3, 3, 6, 6], dtype=torch.int32)
    indices = torch.tensor([4, 1, 2, 4, 1, 2], dtype=torch.int32)
    last = torch.tensor([5, 9, 5, 16], dtype=torch.int32)  # empty queries' last_len is ignored
    plan = treeattn.plan(indptr, indices, last, page_size=16)
    check_tree_plan(plan, (indptr, indices, last), 16)
    assert plan.stats["planned_tokens"] == 37  # identical queries share everything
    assert sorted(plan.merge_query.tolist()) == [1, 3]  # the empty queries: stage 2 writes 0 / -inf


# ---- plan_from_tree: random forests that follow its contract, checked against the table of their paths ----

@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 16, 64]),
    num_nodes=st.integers(1, 30),
    extra_queries=st.integers(0, 6),
    empty_queries=st.integers(0, 2),
    heads=st.sampled_from([(None, None), (32, 8), (4, 1)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_trees_match_the_oracle_and_plan(page_size, num_nodes, extra_queries, empty_queries, heads, seed):
    """plan_from_tree writes the table of the paths, plans it correctly, and shows the stats that
    treeattn.plan finds on that table."""
    tree = random_forest(np.random.default_rng(seed), page_size, num_nodes, extra_queries, empty_queries)
    kw = dict(num_qo_heads=heads[0], num_kv_heads=heads[1], num_sms=132)
    from_tree = plan_from_tree(**tree, page_size=page_size, device=torch.device("cpu"), **kw)
    table = tuple(torch.from_numpy(a) for a in table_of_tree(tree, page_size))
    check_tree_plan(from_tree, table, page_size)
    from_table = treeattn.plan(*table, page_size=page_size, **kw)
    assert from_tree.stats == from_table.stats


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_cache_plans_of_workload_trees(name):
    """The benchmark trees as a TreeKVCache builds them: its plan is correct and shows treeattn.plan's stats."""
    level_tokens, fanout = WORKLOADS[name]
    cache = treeattn.TreeKVCache(1, 1, 16, page_size=16, num_pages=8192, dtype=torch.float32, device="cpu")
    frontier = [cache.add(level_tokens[0] // 16) for _ in range(fanout[0])]
    for tokens, ways in zip(level_tokens[1:], fanout[1:]):
        frontier = [kid for node in frontier for kid in cache.fork(node, ways)]
        cache.append(frontier, tokens // 16)
    plan = cache.plan(frontier)
    table = (plan.kv_indptr.clone(), plan.kv_indices.clone(), plan.kv_last_page_len.clone())
    for leaf, q in zip(frontier, range(len(frontier))):  # the plan's table is the leaves' paths
        slots = cache.path_slots(leaf)
        pages = table[1][table[0][q] : table[0][q + 1]].long()
        assert torch.equal(pages, slots[::16] // 16)
    check_tree_plan(plan, table, 16)
    assert plan.stats == treeattn.plan(*table, page_size=16, num_kv_heads=1).stats


@settings(max_examples=40, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4, 16]),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(1, 20)), max_size=25),
    picks=st.one_of(st.just("all"), st.lists(st.integers(0, 60), min_size=1, max_size=8)),
    num_tokens=st.sampled_from([1, 1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cache_plans_after_random_edits(page_size, ops, picks, num_tokens, seed):
    """TreeKVCache.plan (through plan_from_tree) after random fork/append/release/add, internal nodes and
    several tokens per node included: query i * k + j reads node i's path up to its (k - 1 - j)-th last token;
    the plan is correct and shows treeattn.plan's stats on that table."""
    cache = treeattn.TreeKVCache(1, 1, 16, page_size=page_size, num_pages=4096, dtype=torch.float32, device="cpu")
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
    plan = cache.plan(chosen, num_tokens, num_qo_heads=8)
    rows, last = [], []
    for node in chosen:
        path = cache.path_slots(node)
        for end in range(cache.length(node) - num_tokens + 1, cache.length(node) + 1):
            pages = (path[:end][::page_size] // page_size).tolist()
            rows.append(pages)
            last.append(end - (len(pages) - 1) * page_size if pages else 0)
    table = (torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32),
             torch.tensor([p for r in rows for p in r], dtype=torch.int32), torch.tensor(last, dtype=torch.int32))
    check_tree_plan(plan, table, page_size)
    assert plan.stats == treeattn.plan(*table, page_size=page_size, num_qo_heads=8, num_kv_heads=1).stats


# ---- errors ----

def _table(indptr, indices, last):
    return (torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32),
            torch.tensor(last, dtype=torch.int32))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (_table([0, 2], [0, 1], [3]), {"page_size": 0}, r"page_size: expected an int in \[1, 2147483647\], got 0"),
        ((torch.tensor([0, 2]), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)),
         {"page_size": 16}, "kv_indptr: expected dtype torch.int32, got torch.int64"),
        ((torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0., 1.]), torch.tensor([3], dtype=torch.int32)),
         {"page_size": 16}, "kv_indices: expected dtype torch.int32"),
        ((torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), [3]),
         {"page_size": 16}, "kv_last_page_len: expected a torch.Tensor"),
        (_table([0, 2, 1, 2], [0, 1], [3, 3, 3]), {"page_size": 16},
         r"kv_indptr: expected non-decreasing values, got kv_indptr\[1\]=2 > kv_indptr\[2\]=1"),
        (_table([0, 2, 3], [0, 1], [3, 3]), {"page_size": 16},
         r"kv_indptr: expected kv_indptr\[-1\] == len\(kv_indices\) == 2, got 3"),
        (_table([1, 2], [0, 1], [3]), {"page_size": 16}, r"kv_indptr: expected kv_indptr\[0\] == 0, got 1"),
        (_table([0, 2], [0, 1], [3, 3]), {"page_size": 16}, r"kv_indptr: expected shape \[3\]"),
        (_table([0, 2], [0, 1], [17]), {"page_size": 16},
         r"kv_last_page_len: expected 1..page_size=16 for query 0 \(it has pages\), got 17"),
        (_table([0, 2], [0, 1], [0]), {"page_size": 16},
         "kv_last_page_len: expected 1..page_size=16 for query 0 .*got 0"),
        (_table([0, 2], [0, -1], [3]), {"page_size": 16}, "kv_indices: expected page ids >= 0, got -1"),
        (_table([0, 2], [0, 9], [3]), {"page_size": 16, "num_pages": 9},
         "kv_indices: expected page ids < num_pages=9, got 9"),
    ],
)
def test_plan_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        treeattn.plan(*args, **kwargs)


def _tree(**changes):
    """A valid tree at page size 8: a root of 20 tokens (pages 4 5 6), a child of 7 more continuing page 6 in
    place (pages 6 7) and an empty child with a query below it (its own 1-token child, page 9); queries at the
    child's end, at the root's end (page 6 again, in part), at the grandchild and an empty one. ``changes``
    break it."""
    tree = dict(parent=[-1, 0, 0, 2], start=[0, 20, 20, 20], end=[20, 27, 20, 21],
                pages=[array("i", [4, 5, 6]), array("i", [6, 7]), array("i"), array("i", [9])],
                query_owner=[1, 0, -1, 3], query_end=[27, 20, 0, 21])
    tree.update(changes)
    return tree


_KW = dict(page_size=8, num_qo_heads=None, num_kv_heads=None, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(start=[0, 20, 20]), "tree: expected parent, start, end and pages of one length"),
        (dict(query_end=[27]), r"query_end: expected one entry per query \(4\), got 1"),
        (dict(parent=[-1, 4, 0, 2]), "parent: expected -1 or another node's index < 4 for node 1, got 4"),
        (dict(parent=[-1, 1, 0, 2]), "parent: expected -1 or another node's index < 4 for node 1, got 1"),
        (dict(start=[0, 19, 20, 20]), r"start: expected 20 for node 1 \(a root starts at 0"),
        (dict(end=[20, 27, 19, 21]), "end: expected >= start=20 for node 2, got 19"),
        (dict(end=[20, 27, 20, 2**40]), r"end: expected 0..17179869176 \(2\^31 - 1 pages\) for node 3"),
        (dict(pages=[array("i", [4, 5]), array("i", [6, 7]), array("i"), array("i", [9])]),
         "pages: expected 3 page ids for node 0"),
        (dict(parent=[-1, 2, 1, 0], start=[0, 20, 20, 20], end=[20, 20, 20, 21],
              pages=[array("i", [4, 5, 6]), array("i"), array("i"), array("i", [9])], query_owner=[0, 3, -1, 3],
              query_end=[20, 21, 0, 21]),
         r"parent: expected a forest \(every node leads to a root\), got a cycle"),
        (dict(pages=[array("i", [4, -5, 6]), array("i", [6, 7]), array("i"), array("i", [9])]),
         "pages: expected page ids >= 0, got -5 in node 0"),
        (dict(query_owner=[1, 4, -1, 3]), "query_owner: expected -1 or a node index < 4 for query 1, got 4"),
        (dict(query_end=[27, 20, 2, 21]), r"query_end: expected 0 \(no owner\) for query 2, got 2"),
        (dict(query_end=[20, 20, 0, 21]),
         r"query_end: expected start < query_end <= end of node 1 \(20, 27\] for query 0, got 20"),
        (dict(query_owner=[1, 0, -1, -1], query_end=[27, 20, 0, 0]),
         "query_owner: expected a query at or below every node, got none for node 3"),
    ],
)
def test_tree_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        plan_from_tree(**_tree(**changes), **_KW)


def test_tree_example_and_int32_buffers():
    plan = plan_from_tree(**_tree(), **_KW)
    assert plan.kv_indices.tolist() == [4, 5, 6, 7, 4, 5, 6, 4, 5, 9] and plan.kv_last_page_len.tolist() == [3, 4, 0, 5]
    # Pages 4, 5 and 6 in full (6 through the child; the root reads 4 of its tokens), 3 tokens of page 7 and
    # 5 of page 9 (a copy of page 6's first 4 tokens plus the grandchild's).
    assert plan.stats["unique_tokens"] == 3 * 8 + 3 + 5 and plan.stats["naive_tokens"] == 27 + 20 + 21
    check_tree_plan(plan, (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len), 8)
    with pytest.raises(TypeError, match="pages: expected 1-D int32 buffers"):
        plan_from_tree(**_tree(pages=[np.array([4, 5, 6]), array("i", [6, 7]), array("i"), array("i", [9])]), **_KW)
    with pytest.raises(TypeError, match="pages: expected contiguous 1-D int32 buffers"):
        strided = np.arange(6, dtype=np.int32)[::2]
        plan_from_tree(**_tree(pages=[strided, array("i", [6, 7]), array("i"), array("i", [9])]), **_KW)


def test_num_sms_defaults_to_the_device(monkeypatch):
    """No ``num_sms``: the CUDA device's SM count (asked of the device), 132 elsewhere."""
    import importlib

    from treeattn.testing import assert_same_plan

    plan_module = importlib.import_module("treeattn.plan")  # (treeattn.plan is the function)
    table = tree_table([700, 30], [1, 5], 16)
    args = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert_same_plan(treeattn.plan(*args, page_size=16), treeattn.plan(*args, page_size=16, num_sms=132))
    assert plan_module._sm_count(torch.device("cpu")) == 132
    monkeypatch.setattr(plan_module, "_cuda_sm_count", lambda index: 78 + index)
    assert plan_module._sm_count(torch.device("cuda", 2)) == 80
