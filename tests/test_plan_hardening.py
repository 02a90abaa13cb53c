"""Regression tests of the planner's input handling: one test per defect found by a bad-input probe. Each
input either raises ValueError/TypeError naming the argument, or plans what the reference computes."""

import subprocess
import sys
from array import array

import numpy as np
import pytest
import torch
from planner_oracle import check_tree_plan

import treeattn
from treeattn import _planner
from treeattn.plan import plan_from_tree
from treeattn.testing import PagedTable, assert_close, check_decode


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def test_strided_kv_indices_are_copied():
    strided = i32([5, 9, 1, 9, 2, 9, 4, 9])[::2]  # pages 5 1 2 4, every other element
    plan = treeattn.plan(i32([0, 2, 4]), strided, i32([4, 3]), page_size=4)
    assert plan.kv_indices.is_contiguous() and plan.kv_indices.tolist() == [5, 1, 2, 4]
    table = PagedTable(i32([0, 2, 4]), i32([5, 1, 2, 4]), i32([4, 3]), 4, 10)
    check_decode(table, 4, 16, torch.float32, "cpu", num_kv_heads=2, plan=plan)
    broadcast = i32([3]).expand(4)  # stride 0: one page read four times
    plan = treeattn.plan(i32([0, 4]), broadcast, i32([2]), page_size=4)
    assert plan.kv_indices.tolist() == [3, 3, 3, 3]
    table = PagedTable(i32([0, 4]), i32([3, 3, 3, 3]), i32([2]), 4, 5)
    check_decode(table, 4, 16, torch.float32, "cpu", num_kv_heads=2, plan=plan)


def test_plan_owns_its_table():
    indptr, indices, last = i32([0, 2, 3]), i32([1, 4, 1]), i32([3, 2])
    table = PagedTable(indptr.clone(), indices.clone(), last.clone(), 4, 6)
    plan = treeattn.plan(indptr, indices, last, page_size=4, num_pages=6)
    indices[1] = 10**8  # the caller reuses its buffers after planning
    indptr[1] = 0
    last[0] = 99
    assert plan.kv_indices.tolist() == [1, 4, 1] and plan.kv_indptr.tolist() == [0, 2, 3]
    assert plan.max_page_id == 4  # the bound the ops check is the bound of what the kernels read
    check_decode(table, 4, 16, torch.float32, "cpu", num_kv_heads=2, plan=plan)


def test_refill_with_other_head_hints_stays_exact():
    """A fixed-capacity plan sized for group 4 (blocks of 16 queries) refilled with hints that would make
    blocks of 64: the refill keeps every item within the plan's query block, and decode stays exact."""
    cache = treeattn.TreeKVCache(1, 2, 16, page_size=16, num_pages=64, dtype=torch.float32, device="cpu")
    root = cache.add(40)
    cache.write(0, cache.slots(root), torch.randn(40, 2, 16), torch.randn(40, 2, 16))
    leaves = cache.fork(root, 24)
    cache.write(0, cache.append(leaves), torch.randn(24, 2, 16), torch.randn(24, 2, 16))
    cap = treeattn.PlanCapacity(items=64, rows=256, partial_rows=256, merge_queries=24, nnz=128)
    plan = cache.plan(leaves, num_qo_heads=8, capacity=cap)
    block = plan.max_queries_per_item
    assert block == _planner.SIZING["target_rows_per_item"] // 4 < 24
    assert cache.plan(leaves, num_qo_heads=1, into=plan) is plan
    assert plan.max_queries_per_item == block and plan.stats["max_queries_per_item"] <= block
    q = torch.randn(24, 8, 16)
    k_cache, v_cache = cache.layer(0).values()
    out = treeattn.tree_decode(q, **cache.layer(0), plan=plan)
    table = PagedTable(plan.kv_indptr.clone(), plan.kv_indices[: plan.stats["nnz"]].clone(),
                       plan.kv_last_page_len.clone(), 16, 64)
    for leaf, row in zip(leaves, range(24)):  # the plan's table is the leaves' paths
        pages = table.kv_indices[table.kv_indptr[row] : table.kv_indptr[row + 1]].long()
        assert torch.equal(pages, cache.path_slots(leaf)[::16] // 16)
    assert_close(out, table.reference(q, k_cache, v_cache)[0], torch.float32)


def test_tree_node_without_queries_raises():
    tree = dict(parent=[-1, 0, 0], start=[0, 8, 8], end=[8, 9, 9],
                pages=[array("i", [0]), array("i", [1]), array("i", [2])], query_owner=[1], query_end=[9])
    with pytest.raises(ValueError, match="query_owner: expected a query at or below every node, got none for node 2"):
        plan_from_tree(**tree, page_size=8, num_qo_heads=None, num_kv_heads=None, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="got none for node 2"):
        _planner.plan_tree(**tree, options=_planner.Options(page_size=8))


@pytest.mark.parametrize(
    "arrays, options, error, match",
    [
        ((np.array([0, 1], np.int32), np.array([0], np.int32), np.array([1], np.int32)), dict(num_kv_heads=0),
         ValueError, r"num_kv_heads: expected an int in \[1, 2147483647\], got 0"),
        ((np.zeros((2, 1), np.int32), np.array([0], np.int32), np.array([1], np.int32)), {},
         ValueError, r"kv_indptr: expected a 1-D array, got shape \[2, 1\]"),
        ((np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)), {},
         ValueError, r"kv_indptr: expected shape \[1\]"),
        ((np.array([0, 1], np.int32), np.array([2**32 + 1], np.int64), np.array([1], np.int32)), {},
         TypeError, "kv_indices: expected dtype int32, got int64"),
        (([0, 1], np.array([0], np.int32), np.array([1], np.int32)), {},
         TypeError, "kv_indptr: expected a 1-D int32 numpy array, got list"),
        ((np.array([0, 1], np.int32), np.array([0], np.int32), np.array([1], np.int32)), dict(capacity=(1, 1, 1, 1, 1)),
         TypeError, "capacity: expected a PlanCapacity"),
        ((np.array([0, 1], np.int32), np.array([0], np.int32), np.array([1], np.int32)), dict(page_size=2**31),
         ValueError, r"page_size: expected an int in \[1, 2147483647\], got 2147483648"),
    ],
)
def test_direct_planner_calls_reject_bad_arrays(arrays, options, error, match):
    with pytest.raises(error, match=match):
        _planner.plan_table(*arrays, _planner.Options(**{"page_size": 4, **options}))


def test_huge_page_ids_plan_in_memory_linear_in_nnz():
    """Page id 2^31 - 1 without num_pages: the planner's memory follows nnz, not the largest id (a child
    process with only numpy and the planner loaded, so its peak RSS is the planner's)."""
    code = f"""
import importlib.util, resource, numpy as np
spec = importlib.util.spec_from_file_location("_planner", {_planner.__file__!r})
planner = importlib.util.module_from_spec(spec); spec.loader.exec_module(planner)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
a = lambda v: np.array(v, np.int32)
result = planner.plan_table(a([0, 2]), a([0, 2**31 - 1]), a([4]), planner.Options(page_size=4))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result["stats"]["unique_tokens"], result["max_page_id"], after - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    unique, max_page, grown_kib = map(int, out.stdout.split())
    assert (unique, max_page) == (8, 2**31 - 1)
    assert grown_kib < 64 * 1024, f"peak memory grew {grown_kib} KiB"


def test_page_size_bool_rejected():
    with pytest.raises(TypeError, match="page_size: expected an int, got bool True"):
        treeattn.plan(i32([0, 1]), i32([0]), i32([1]), page_size=True)


def test_numpy_integers_accepted():
    table = (i32([0, 2, 3]), i32([1, 4, 1]), i32([3, 2]))
    as_ints = treeattn.plan(*table, page_size=4, num_pages=6, num_qo_heads=8, num_kv_heads=2, num_sms=3)
    as_numpy = treeattn.plan(*table, page_size=np.int64(4), num_pages=np.int32(6), num_qo_heads=np.int16(8),
                             num_kv_heads=np.uint8(2), num_sms=np.int64(3))
    assert as_numpy.page_size == 4 and type(as_numpy.page_size) is int
    assert as_numpy.stats == as_ints.stats
    assert all(torch.equal(a, b) for a, b in zip(as_numpy.tensor_args(), as_ints.tensor_args()))
    with pytest.raises(TypeError, match="num_sms: expected an int, got float 3.0"):
        treeattn.plan(*table, page_size=4, num_sms=3.0)


def test_negative_num_pages_rejected():
    with pytest.raises(ValueError, match=r"num_pages: expected an int in \[0, 2147483648\], got -1"):
        treeattn.plan(i32([0, 1]), i32([0]), i32([1]), page_size=4, num_pages=-1)


def test_sizes_that_would_wrap_int32_rejected_or_kept_in_range():
    with pytest.raises(ValueError, match=r"page_size: expected an int in \[1, 2147483647\], got 2147483648"):
        treeattn.plan(i32([0, 1]), i32([0]), i32([1]), page_size=2**31)
    # The largest page size: an item never holds more than 2^31 - 1 tokens, however the sizing would chunk.
    page_size = 2**31 - 1
    table = (i32([0, 3, 6]), i32([7, 8, 9, 7, 8, 10]), i32([5, page_size]))
    plan = treeattn.plan(*table, page_size=page_size, num_sms=1)
    check_tree_plan(plan, table, page_size)
    assert plan.stats["naive_tokens"] == 5 * page_size + 5 and plan.max_item_tokens <= 2**31 - 1


def test_capacity_must_be_a_plan_capacity():
    table = (i32([0, 1]), i32([0]), i32([1]))
    with pytest.raises(TypeError, match="capacity: expected a treeattn.PlanCapacity or None, got tuple"):
        treeattn.plan(*table, page_size=4, capacity=(8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match=r"capacity.items: expected an int in \[1, 2147483646\], got 0"):
        treeattn.PlanCapacity(items=0, rows=8, partial_rows=8, merge_queries=8, nnz=8)
    with pytest.raises(TypeError, match="capacity.nnz: expected an int, got bool"):
        treeattn.PlanCapacity(items=8, rows=8, partial_rows=8, merge_queries=8, nnz=True)


def test_into_must_be_a_fixed_capacity_plan_of_this_cache():
    tree = dict(parent=[-1, 0, 0], start=[0, 20, 20], end=[20, 21, 21],
                pages=[array("i", [0, 1]), array("i", [2]), array("i", [3])], query_owner=[1, 2], query_end=[21, 21])
    kw = dict(num_qo_heads=None, num_kv_heads=None, device=torch.device("cpu"))
    cap = treeattn.PlanCapacity(items=16, rows=32, partial_rows=32, merge_queries=2, nnz=32)
    plan = plan_from_tree(**tree, page_size=16, capacity=cap, **kw)
    with pytest.raises(TypeError, match=r"into: expected a treeattn.TreePlan \(made with capacity=\) or None, got str"):
        plan_from_tree(**tree, page_size=16, into="x", **kw)
    with pytest.raises(ValueError, match=r"plan: expected a plan built with capacity=PlanCapacity\(\.\.\.\) to refill"):
        plan_from_tree(**tree, page_size=16, into=plan_from_tree(**tree, page_size=16, **kw), **kw)
    with pytest.raises(ValueError, match=r"into: expected a plan with page_size 8 \(the cache's\), got 16"):
        pages = [array("i", [0, 1, 4]), array("i", [2]), array("i", [3])]
        plan_from_tree(**{**tree, "end": [20, 24, 24], "pages": pages}, page_size=8, into=plan, **kw)
    with pytest.raises(ValueError, match=r"into: expected a plan on device meta \(the cache's\), got cpu"):
        plan_from_tree(**tree, page_size=16, into=plan, **{**kw, "device": torch.device("meta")})
    with pytest.raises(ValueError, match=r"into: expected 2 queries \(the captured plan's\), got 1"):
        plan_from_tree(**{**tree, "query_owner": [1], "query_end": [21], "parent": [-1, 0], "start": [0, 20],
                          "end": [20, 21], "pages": tree["pages"][:2]}, page_size=16, into=plan, **kw)
    assert plan_from_tree(**tree, page_size=16, into=plan, **kw) is plan
    # Through the cache, which plans with its own page size and device.
    cache = treeattn.TreeKVCache(1, 1, 16, page_size=16, num_pages=32, dtype=torch.float32, device="cpu")
    leaves = cache.fork(cache.add(20), 2)
    with pytest.raises(ValueError, match="into: expected a plan with page_size 16"):
        small = treeattn.TreeKVCache(1, 1, 16, page_size=8, num_pages=32, dtype=torch.float32, device="cpu")
        cache.plan(leaves, into=small.plan(small.fork(small.add(20), 2), capacity=cap))
    plan = cache.plan(leaves, capacity=cap)
    assert cache.plan(leaves[::-1], into=plan) is plan


@pytest.mark.parametrize(
    "indptr, indices, last_len, num_pages",
    [
        ([0, 2, 4], [3, 9, 3, 5], [2, 4], None),  # the largest id only on a partial last page
        ([0, 3, 5], [0, 1, 2, 7, 1], [4, 2], None),  # page 1 read whole and in part by other queries
        ([0, 2, 4], [0, 1, 5, 2 * 4 + 64], [4, 4], None),  # past the dense range (2 nnz + 64), after others
        ([0, 2, 4], [0, 1, 5, 2 * 4 + 63], [4, 1], None),  # the last id of the dense range
        ([0, 4], [6, 7, 8, 9], [3], 10),  # a consecutive run ending at num_pages - 1
        ([0, 3, 3, 5], [2, 0, 1, 2, 0], [1, 1, 4], 3),
    ],
)
def test_page_ids_at_the_edges_of_the_dense_range(indptr, indices, last_len, num_pages):
    """Ids are checked while distinct pages are counted, over a bitset as large as the dense range; ids past
    it go another way. Both give the oracle's plan."""
    plan = treeattn.plan(i32(indptr), i32(indices), i32(last_len), page_size=4, num_pages=num_pages)
    check_tree_plan(plan, (indptr, indices, last_len), 4)


@pytest.mark.parametrize(
    "indices, num_pages, match",
    [
        ([6, 7, 8, 9, 10], 10, "page ids < num_pages=10, got 10"),  # a consecutive run crossing num_pages
        ([1, 2, 3, 4, 30], 10, "page ids < num_pages=10, got 30"),
        ([-2, -1, 0, 1, 2], None, "page ids >= 0, got -2"),  # consecutive through 0
        ([5, 1, -7, 2, 3], None, "page ids >= 0, got -7"),
        ([2**31 - 2, 2**31 - 1, 0, 1, 2], 12, f"page ids < num_pages=12, got {2**31 - 1}"),
    ],
)
def test_bad_page_ids_found_in_any_run(indices, num_pages, match):
    with pytest.raises(ValueError, match=match):
        treeattn.plan(i32([0, 2, 5]), i32(indices), i32([4, 4]), page_size=4, num_pages=num_pages)


def test_cache_plan_checks_its_node_list_every_call():
    """TreeKVCache.plan remembers the nodes of the last list of ids it resolved: a released node, a float or
    a bool equal to a remembered id still raise."""
    cache = treeattn.TreeKVCache(1, 1, 4, page_size=4, num_pages=16, dtype=torch.float32, device="cpu")
    leaves = cache.fork(cache.add(5), 3)
    cache.append(leaves)
    first = cache.plan(leaves)
    assert torch.equal(cache.plan(list(leaves)).kv_indices, first.kv_indices)
    with pytest.raises(ValueError, match="expected a node"):
        cache.plan([float(leaves[0]), *leaves[1:]])
    assert leaves[0] == 1
    with pytest.raises(ValueError, match="expected a node"):
        cache.plan([True, *leaves[1:]])
    cache.release(leaves[2])
    with pytest.raises(ValueError, match=f"node {leaves[2]} was released"):
        cache.plan(leaves)
    assert cache.plan(leaves[:2]).num_queries == 2
