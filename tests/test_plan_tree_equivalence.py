"""Plans from the tree equal plans from the table: ``TreeKVCache.plan`` (the planner walks the cache's nodes) and
``treeattn.plan`` on the paged table of the same queries (the planner re-discovers the sharing by comparing page
lists) give the same table, stats, kernel bounds and work: the same items (pages, tokens, queries), each query
written directly by the same item or merged from the same items in the same root->leaf order. Only the order
of the items in the buffer and where in the table an item finds its pages may differ: the tree walk visits
siblings in the order the queries reach them and points shared items at the first query of that order, the
table planner sorts queries by page ids.

Random forests are grown, forked, released and copied on write through the cache's public methods, for fresh
plans, fixed-capacity plans and plans refilled in place step after step (the walk the cache keeps between
decode steps).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

import treeattn
from treeattn import OutOfPages, PlanCapacity, TreeKVCache
from treeattn.plan import PLAN_TENSOR_FIELDS

HKV, HQ, DIM, NUM_PAGES = 2, 4, 16, 384


def table_plan(plan: treeattn.TreePlan, page_size: int, **kw) -> treeattn.TreePlan:
    """``treeattn.plan`` on the table ``plan`` holds, with the hints the cache plans with."""
    return treeattn.plan(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, page_size=page_size,
                         num_qo_heads=HQ, num_kv_heads=HKV, **kw)


def work(plan: treeattn.TreePlan) -> tuple:
    """The plan's work, independent of the order of its items: a sorted list of items (page ids, tokens,
    queries), and per query the items that write it directly or, in merge order, its partial states."""
    t = {name: getattr(plan, name).tolist() for name in PLAN_TENSOR_FIELDS}
    s = plan.page_size
    row_item, items = {}, []
    for i in range(plan.num_items):
        tokens, ptr = t["item_num_tokens"][i], t["item_page_ptr"][i]
        rows = range(t["item_row_ptr"][i], t["item_row_ptr"][i + 1])
        pages = tuple(t["kv_indices"][ptr : ptr + -(-tokens // s)])
        key = (pages, tokens, tuple(sorted(t["row_query"][r] for r in rows)))
        if tokens or rows:  # (padding items of a fixed-capacity plan read and write nothing)
            items.append(key)
        row_item.update((r, key) for r in rows)
    direct = sorted((t["row_query"][r], key) for r, key in row_item.items() if t["row_dest"][r] < 0)
    dest = {t["row_dest"][r]: key for r, key in row_item.items() if t["row_dest"][r] >= 0}
    merged = {q: [dest[p] for p in range(t["merge_ptr"][m], t["merge_ptr"][m + 1])]
              for m, q in enumerate(t["merge_query"]) if q >= 0}
    return sorted(items), direct, merged


def assert_equivalent(tree_plan: treeattn.TreePlan, table_plan: treeattn.TreePlan) -> None:
    """Same table (bits), stats, kernel bounds and work."""
    for name in ("kv_indptr", "kv_indices", "kv_last_page_len"):
        assert torch.equal(getattr(tree_plan, name), getattr(table_plan, name)), name
    assert tree_plan.stats == table_plan.stats
    for name in ("num_items", "num_partial_rows", "max_queries_per_item", "max_item_tokens", "max_page_id"):
        assert getattr(tree_plan, name) == getattr(table_plan, name), name
    assert work(tree_plan) == work(table_plan)


def check_table(cache: TreeKVCache, plan: treeattn.TreePlan, nodes: list[int], num_tokens: int) -> None:
    """Query ``i * num_tokens + j`` reads the slots of ``nodes[i]``'s path up to its ``j``-th last token."""
    s = cache.page_size
    for i, node in enumerate(nodes):
        path = cache.path_slots(node).tolist()
        for j in range(num_tokens):
            q = i * num_tokens + j
            want = path[: len(path) - num_tokens + 1 + j] if path else []
            pages = plan.kv_indices[plan.kv_indptr[q] : plan.kv_indptr[q + 1]].long()
            slots = (pages[:, None] * s + torch.arange(s)).reshape(-1)[: len(want)]
            assert slots.tolist() == want, (node, j)


class TreeVsTable(RuleBasedStateMachine):
    """Random cache operations; after each, plans of random node lists from the tree equal those of the table."""

    @initialize(page_size=st.sampled_from([1, 3, 4, 16]))
    def setup(self, page_size):
        self.cache = TreeKVCache(1, HKV, DIM, page_size=page_size, num_pages=NUM_PAGES, dtype=torch.float32,
                                 device="cpu")
        self.kids: dict[int, set[int]] = {}  # node -> children still in the tree
        self.parents: dict[int, int | None] = {}
        self.live: list[int] = []
        self.released: set[int] = set()
        self.refill: tuple[list[int], treeattn.TreePlan] | None = None  # a decode loop's fixed-capacity plan
        self.add(num_tokens=5)

    def _new(self, node: int, parent: int | None) -> None:
        self.kids[node], self.parents[node] = set(), parent
        self.live.append(node)
        if parent is not None:
            self.kids[parent].add(node)

    def leaves(self) -> list[int]:
        return [n for n in self.live if not self.kids[n]]

    @rule(num_tokens=st.integers(0, 40))
    def add(self, num_tokens):
        try:
            self._new(self.cache.add(num_tokens), None)
        except OutOfPages:
            pass

    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        node = data.draw(st.sampled_from(self.live))
        for kid in self.cache.fork(node, n):
            self._new(kid, node)

    @rule(data=st.data(), num_tokens=st.integers(1, 20))
    def append(self, data, num_tokens):
        """Several leaves at once: siblings continuing a shared partial page copy it on write."""
        leaves = self.leaves()
        chosen = data.draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=4, unique=True)) if leaves else []
        if chosen:
            try:
                self.cache.append(chosen, num_tokens)
            except OutOfPages:
                pass

    @precondition(lambda self: len(self.live) > 1)
    @rule(data=st.data())
    def release(self, data):
        node = data.draw(st.sampled_from(self.live))
        self.cache.release(node)
        self.live.remove(node)
        self.released.add(node)
        while node is not None and node in self.released and not self.kids[node]:  # removed, as the cache does
            parent = self.parents[node]
            if parent is not None:
                self.kids[parent].discard(node)
            node = parent
        if self.refill is not None and not set(self.refill[0]) <= set(self.live):
            self.refill = None

    @rule(data=st.data(), num_tokens=st.sampled_from([1, 1, 2]))
    def plan_equals_table_plan(self, data, num_tokens):
        usable = [n for n in self.live if num_tokens == 1 or self.cache.length(n) >= num_tokens]
        if not usable:
            return
        nodes = data.draw(st.lists(st.sampled_from(usable), min_size=1, max_size=8, unique=True))
        s = self.cache.page_size
        plan = self.cache.plan(nodes, num_tokens, num_qo_heads=HQ)
        check_table(self.cache, plan, nodes, num_tokens)
        assert_equivalent(plan, table_plan(plan, s))
        cap = PlanCapacity.of(plan, headroom=data.draw(st.sampled_from([1.0, 2.0])))
        fixed = self.cache.plan(nodes, num_tokens, num_qo_heads=HQ, capacity=cap)
        assert_equivalent(fixed, table_plan(plan, s, capacity=cap))

    @rule(headroom=st.sampled_from([1.5, 3.0]))
    def refill_leaves(self, headroom):
        """A decode loop: the same leaves re-planned into one fixed-capacity plan after each step."""
        if self.refill is None:
            leaves = self.leaves()[:6]
            if not leaves:
                return
            first = self.cache.plan(leaves, num_qo_heads=HQ)
            self.refill = leaves, self.cache.plan(leaves, num_qo_heads=HQ,
                                                  capacity=PlanCapacity.of(first, headroom=headroom))
        leaves, into = self.refill
        try:
            refilled = self.cache.plan(leaves, num_qo_heads=HQ, into=into)
        except ValueError as exc:  # the tree outgrew the capacity: the plan is left as it was
            assert "capacity" in str(exc)
            self.refill = None
            return
        fresh = self.cache.plan(leaves, num_qo_heads=HQ)
        check_table(self.cache, refilled, leaves, 1)
        assert_equivalent(refilled, table_plan(fresh, self.cache.page_size, capacity=into.capacity))


TreeVsTable.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_tree_plan_equals_table_plan = TreeVsTable.TestCase


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_steps_keep_equal_plans(page_size):
    """Many decode steps over one fork (the reused walk, pages filling and starting, copies on write)."""
    cache = TreeKVCache(1, HKV, DIM, page_size=page_size, num_pages=2048, dtype=torch.float32, device="cpu")
    root = cache.add(37)
    leaves = cache.fork(root, 5)
    for step in range(2 * page_size + 3):
        cache.append(leaves[: 1 + step % 5])
        plan = cache.plan(leaves, num_qo_heads=HQ)
        assert_equivalent(plan, table_plan(plan, page_size))
