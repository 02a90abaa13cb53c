"""Planner: stats against independent counts, exact coverage of every query's KV, errors."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import treeattn
from treeattn.testing import random_table, tree_table


def _plan(table, **kw):
    return treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=table.page_size, **kw)


def _independent_stats(table):
    slots = [table.token_slots(i).tolist() for i in range(table.num_queries)]
    return {
        "unique_tokens": len({s for row in slots for s in row}),
        "naive_tokens": sum(len(row) for row in slots),
    }, slots


def _coverage(plan, table):
    """Per query, the KV slots its items read, in the plan's merge (root→leaf) order."""
    indices = plan.kv_indices.cpu()
    row_ptr, row_query, row_dest = plan.item_row_ptr.cpu(), plan.row_query.cpu(), plan.row_dest.cpu()
    per_query = {i: [] for i in range(table.num_queries)}
    for item in range(plan.num_items):
        first, n_tok = int(plan.item_page_ptr[item]), int(plan.item_num_tokens[item])
        t = torch.arange(n_tok)
        slots = (indices[first + t // table.page_size].long() * table.page_size + t % table.page_size).tolist()
        for r in range(int(row_ptr[item]), int(row_ptr[item + 1])):
            per_query[int(row_query[r])].append((int(row_dest[r]), slots))
    return per_query


def _check_plan(table, **kw):
    plan = _plan(table, **kw)
    expected, slots = _independent_stats(table)
    assert plan.stats["unique_tokens"] == expected["unique_tokens"]
    assert plan.stats["naive_tokens"] == expected["naive_tokens"]
    assert plan.stats["work_items"] == plan.num_items == plan.item_page_ptr.shape[0]
    assert plan.stats["planned_tokens"] <= plan.stats["naive_tokens"]
    merge_query = plan.merge_query.cpu().tolist()
    merge_ptr = plan.merge_ptr.cpu().tolist()
    for q, pieces in _coverage(plan, table).items():
        if len(pieces) == 1:
            assert pieces[0][0] == -1, "a query with one item writes its output directly"
            assert q not in merge_query
        else:
            assert all(dest >= 0 for dest, _ in pieces)
            m = merge_query.index(q)
            # Partial rows of a query are contiguous and ordered root→leaf.
            assert sorted(d for d, _ in pieces) == list(range(merge_ptr[m], merge_ptr[m + 1]))
        ordered = [s for _, piece in sorted(pieces) for s in piece]
        assert ordered == slots[q], f"query {q}: items do not cover its KV exactly, in order"
    return plan


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_tree_plan_covers_every_query(page_size):
    _check_plan(tree_table([100, 37, 9], [1, 3, 4], page_size, spare_pages=2))


def test_best_of_n_reads_prefix_once_per_block():
    table = tree_table([4096, 256], [1, 64], 16)
    plan = _check_plan(table, num_qo_heads=32, num_kv_heads=8)
    # 64 queries x group 4 -> 4 blocks of 16 queries; each block reads the prompt once.
    assert plan.stats["planned_tokens"] == 4 * 4096 + 64 * 256
    assert plan.stats["unique_tokens"] == 4096 + 64 * 256
    assert plan.stats["naive_tokens"] == 64 * (4096 + 256)


def test_no_sharing_is_split_kv_decode():
    table = tree_table([0, 700], [1, 5], 16)
    plan = _check_plan(table)
    assert plan.stats["planned_tokens"] == plan.stats["naive_tokens"] == 5 * 700
    assert plan.stats["max_queries_per_item"] == 1


def test_identical_and_empty_queries():
    indptr = torch.tensor([0, 3, 3, 6, 6], dtype=torch.int32)
    indices = torch.tensor([4, 1, 2, 4, 1, 2], dtype=torch.int32)
    last = torch.tensor([5, 9, 5, 16], dtype=torch.int32)  # empty queries' last_len is ignored
    plan = treeattn.plan(indptr, indices, last, page_size=16)
    assert plan.stats["unique_tokens"] == 16 + 16 + 5
    assert plan.stats["planned_tokens"] == 37  # identical queries share everything
    assert sorted(plan.merge_query.tolist()) == [1, 3]  # the empty queries: stage 2 writes 0 / -inf


@settings(max_examples=40, deadline=None)
@given(
    num_queries=st.integers(1, 20),
    page_size=st.sampled_from([1, 3, 16]),
    seed=st.integers(0, 2**31 - 1),
    heads=st.sampled_from([(32, 8), (8, 8), (16, 1)]),
)
def test_random_tables(num_queries, page_size, seed, heads):
    g = torch.Generator().manual_seed(seed)
    table = random_table(num_queries, page_size, generator=g)
    _check_plan(table, num_qo_heads=heads[0], num_kv_heads=heads[1], num_sms=1)


def _table(indptr, indices, last):
    return (torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32),
            torch.tensor(last, dtype=torch.int32))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (_table([0, 2], [0, 1], [3]), {"page_size": 0}, "page_size: expected a positive int"),
        ((torch.tensor([0, 2]), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)),
         {"page_size": 16}, "kv_indptr: expected dtype torch.int32, got torch.int64"),
        ((torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0., 1.]), torch.tensor([3], dtype=torch.int32)),
         {"page_size": 16}, "kv_indices: expected dtype torch.int32"),
        ((torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), [3]),
         {"page_size": 16}, "kv_last_page_len: expected a torch.Tensor"),
        (_table([0, 2, 1, 2], [0, 1], [3, 3, 3]), {"page_size": 16}, r"kv_indptr: expected non-decreasing"),
        (_table([0, 2, 3], [0, 1], [3, 3]), {"page_size": 16}, r"kv_indptr: expected kv_indptr\[-1\] == len\(kv_indices\) == 2, got 3"),
        (_table([1, 2], [0, 1], [3]), {"page_size": 16}, r"kv_indptr: expected kv_indptr\[0\] == 0, got 1"),
        (_table([0, 2], [0, 1], [3, 3]), {"page_size": 16}, r"kv_indptr: expected shape \[3\]"),
        (_table([0, 2], [0, 1], [17]), {"page_size": 16}, "kv_last_page_len: expected 1..page_size=16 for query 0 .*got 17"),
        (_table([0, 2], [0, 1], [0]), {"page_size": 16}, "kv_last_page_len: expected 1..page_size=16 for query 0 .*got 0"),
        (_table([0, 2], [0, -1], [3]), {"page_size": 16}, "kv_indices: expected page ids >= 0, got -1"),
        (_table([0, 2], [0, 9], [3]), {"page_size": 16, "num_pages": 9}, "kv_indices: expected page ids < num_pages=9, got 9"),
    ],
)
def test_plan_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        treeattn.plan(*args, **kwargs)
