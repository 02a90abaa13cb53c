"""Plans from the tree equal plans from the table: ``TreeKVCache.plan`` (the planner walks the cache's nodes) and
``treeattn.plan`` on the paged table of the same queries (the planner re-discovers the sharing by comparing page
lists) give the same table, stats, kernel bounds and work: the same items (pages, tokens, queries), each query
written directly by the same item or merged from the same items in the same root->leaf order. Only the order
of the items in the buffer and where in the table an item finds its pages may differ: the tree walk visits
siblings in the order the queries reach them and points shared items at the first query of that order, the
table planner sorts queries by page ids.

Random forests are grown, forked, released and copied on write through the cache's public methods, for fresh
plans, fixed-capacity plans and plans refilled in place step after step (the walk the cache keeps between
decode steps). Decode steps where every planned leaf grew by one token are patched from the last plan (its
lengths only) when no page was started or filled: those plans have the very bits of a plan made in full, and
plans handed out earlier never change.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

import treeattn
from treeattn import OutOfPages, PlanCapacity, TreeKVCache
from treeattn.plan import PLAN_TENSOR_FIELDS, LastTreePlan, plan_from_tree

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


def full_plan(cache: TreeKVCache, nodes: list[int], num_tokens: int = 1, **kw) -> treeattn.TreePlan:
    """The cache's plan made in full (a fresh walk, nothing patched), with the hints the cache plans with."""
    walk = cache.tree.plan_walk(cache.tree.nodes(nodes, "plan"), num_tokens, reuse=False)
    return plan_from_tree(parent=walk.parent, start=walk.start, end=walk.end, pages=walk.pages,
                          query_owner=walk.query_owner, query_end=walk.query_end, page_size=cache.page_size,
                          num_qo_heads=HQ, num_kv_heads=cache.num_kv_heads, device=cache.device, **kw)


def assert_same_plan(plan: treeattn.TreePlan, want: treeattn.TreePlan) -> None:
    """The same bits, stats and ints (the same plan, however it was made)."""
    for name in PLAN_TENSOR_FIELDS:
        assert torch.equal(getattr(plan, name), getattr(want, name)), name
    assert plan.stats == want.stats
    for name in ("num_queries", "num_items", "num_partial_rows", "max_queries_per_item", "max_item_tokens",
                 "max_page_id", "capacity"):
        assert getattr(plan, name) == getattr(want, name), name


def check_table(cache: TreeKVCache, plan: treeattn.TreePlan, nodes: list[int], num_tokens: int) -> None:
    """Query ``i * num_tokens + j`` reads the slots of ``nodes[i]``'s path up to its ``j``-th last token. A query
    whose tokens all lie on an ancestor's path reads that ancestor's slots: a child that copied the ancestor's
    partial page on write holds the same values there, but the planner reads (and shares) the original."""
    s = cache.page_size
    for i, node in enumerate(nodes):
        leaf = cache.tree.node(node)
        for j in range(num_tokens):
            q = i * num_tokens + j
            end = leaf.end - num_tokens + 1 + j
            holder = leaf  # (ancestors may be released nodes still in the tree)
            while holder.parent is not None and holder.parent.end >= end:
                holder = holder.parent
            want = cache.tree.path_slots(holder).tolist()[:end]
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
        fresh = full_plan(self.cache, leaves)
        check_table(self.cache, refilled, leaves, 1)
        assert_same_plan(refilled, full_plan(self.cache, leaves, capacity=into.capacity, into=fresh_into(into)))
        assert_equivalent(refilled, table_plan(fresh, self.cache.page_size, capacity=into.capacity))

    @rule(data=st.data())
    def decode_steps(self, data):
        """Steps of a decode loop: every planned leaf grows by one token, then the same leaves are planned (the
        last plan patched when no leaf started or filled a page); plans handed out before never change."""
        leaves = self.leaves()[:8]
        if not leaves:
            return
        held = []
        for _ in range(data.draw(st.integers(1, 4))):
            try:
                self.cache.append(leaves)
            except OutOfPages:
                break
            plan = self.cache.plan(leaves, num_qo_heads=HQ)
            assert_same_plan(plan, full_plan(self.cache, leaves))
            held.append((plan, plan._buffer.clone()))
        for plan, bits in held:
            assert torch.equal(plan._buffer, bits)


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


def fresh_into(plan: treeattn.TreePlan) -> treeattn.TreePlan:
    """A fixed-capacity plan like ``plan`` (same capacity, query block), to refill in full for comparison."""
    twin = treeattn.TreePlan.__new__(treeattn.TreePlan)
    twin.__dict__.update(plan.__dict__)
    twin._buffer = plan._buffer.clone()
    for name, view in zip(PLAN_TENSOR_FIELDS, twin._buffer.split_with_sizes([t.numel() for t in plan.tensor_args()])):
        setattr(twin, name, view)
    return twin


def count_patches(monkeypatch) -> list:
    """Plans LastTreePlan.patched returns from now on (None when it declined), in order."""
    calls = []
    patched = LastTreePlan.patched

    def spy(self, query_end, into):
        calls.append(patched(self, query_end, into))
        return calls[-1]

    monkeypatch.setattr(LastTreePlan, "patched", spy)
    return calls


@pytest.mark.parametrize("page_size", [4, 16])
def test_decode_steps_patch_lengths_inside_pages(monkeypatch, page_size):
    """One token per leaf per step: a step that starts or fills no page is patched from the last plan, the others
    are planned in full; every plan has the bits of one made in full, and earlier plans keep theirs."""
    cache = TreeKVCache(1, HKV, DIM, page_size=page_size, num_pages=2048, dtype=torch.float32, device="cpu")
    root = cache.add(8 * page_size + 3)
    leaves = cache.fork(root, 6)
    cache.append(leaves, 2)  # (each leaf copies the root's partial page, then grows in place)
    cache.plan(leaves, num_qo_heads=HQ)
    calls = count_patches(monkeypatch)
    held = []
    for _ in range(3 * page_size):
        inside = all(cache.length(n) % page_size not in (0, page_size - 1) for n in leaves)
        cache.append(leaves)
        plan = cache.plan(leaves, num_qo_heads=HQ)
        assert (calls[-1] is not None) == inside
        assert_same_plan(plan, full_plan(cache, leaves))
        held.append((plan, plan._buffer.clone()))
    assert sum(c is not None for c in calls) == 3 * (page_size - 2)
    for plan, bits in held:
        assert torch.equal(plan._buffer, bits)


def test_page_crossing_or_other_change_plans_in_full(monkeypatch):
    """An append that starts a page, a fork, a release, other hints: the plan is made in full."""
    s = 8
    cache = TreeKVCache(1, HKV, DIM, page_size=s, num_pages=512, dtype=torch.float32, device="cpu")
    root = cache.add(3 * s + 2)
    leaves = cache.fork(root, 3)
    cache.append(leaves, 3)  # path length 3s + 5: one step from filling no page
    cache.plan(leaves, num_qo_heads=HQ)
    calls = count_patches(monkeypatch)
    cache.append(leaves)
    assert_same_plan(cache.plan(leaves, num_qo_heads=HQ), full_plan(cache, leaves))
    assert calls[-1] is not None
    cache.append(leaves, 2)  # fills the page: in full
    assert_same_plan(cache.plan(leaves, num_qo_heads=HQ), full_plan(cache, leaves))
    cache.append(leaves)  # starts a page: a new page list, in full
    assert_same_plan(cache.plan(leaves, num_qo_heads=HQ), full_plan(cache, leaves))
    patched_so_far = sum(c is not None for c in calls)
    assert patched_so_far == 1
    extra = cache.fork(root, 1)[0]  # (a new node, read by no planned leaf: the tree changed all the same)
    cache.append(leaves)
    assert_same_plan(cache.plan(leaves, num_qo_heads=HQ), full_plan(cache, leaves))
    cache.release(extra)
    cache.append(leaves)
    assert_same_plan(cache.plan(leaves, num_qo_heads=HQ), full_plan(cache, leaves))
    cache.append(leaves)
    plan = cache.plan(leaves, num_qo_heads=2 * HQ)  # other hints: in full, with them
    walk = cache.tree.plan_walk(cache.tree.nodes(leaves, "plan"), reuse=False)
    want = plan_from_tree(parent=walk.parent, start=walk.start, end=walk.end, pages=walk.pages,
                          query_owner=walk.query_owner, query_end=walk.query_end, page_size=s,
                          num_qo_heads=2 * HQ, num_kv_heads=HKV, device=cache.device)
    assert_same_plan(plan, want)
    assert sum(c is not None for c in calls) == patched_so_far


def test_refill_into_is_patched_in_place(monkeypatch):
    """into= the last plan: patched in its own buffer (the documented refill); a plan made without capacity in
    between is not a fixed-capacity one; into= another plan is refilled in full."""
    s = 16
    cache = TreeKVCache(1, HKV, DIM, page_size=s, num_pages=512, dtype=torch.float32, device="cpu")
    root = cache.add(5 * s + 1)
    leaves = cache.fork(root, 4)
    cache.append(leaves, 1)
    cap = PlanCapacity.of(cache.plan(leaves, num_qo_heads=HQ), headroom=2.0)
    into = cache.plan(leaves, num_qo_heads=HQ, capacity=cap)
    other = cache.plan(leaves, num_qo_heads=HQ, capacity=cap)
    calls = count_patches(monkeypatch)
    for _ in range(3):
        cache.append(leaves)
        address = into._buffer.data_ptr()
        assert cache.plan(leaves, num_qo_heads=HQ, into=into) is into
        assert into._buffer.data_ptr() == address
        assert_same_plan(into, full_plan(cache, leaves, capacity=cap, into=fresh_into(into)))
    assert [c is into for c in calls] == [True, True]  # (the first refill follows another request: in full)
    cache.append(leaves)
    fresh = cache.plan(leaves, num_qo_heads=HQ)  # no capacity asked: none given
    assert fresh.capacity is None
    assert_same_plan(fresh, full_plan(cache, leaves))
    cache.append(leaves)
    assert cache.plan(leaves, num_qo_heads=HQ, into=other) is other
    assert_same_plan(other, full_plan(cache, leaves, capacity=cap, into=fresh_into(other)))


@pytest.mark.parametrize("page_size", [3, 4, 16])
def test_query_on_ancestor_tokens_reads_the_original_page(page_size):
    """Siblings that appended to a shared partial page (the second copied it on write), then the parent
    released: a 2-token query of the copying sibling whose first query ends at its start reads the parent's
    page, whose values the copy holds too; the table equals the table planner's."""
    cache = TreeKVCache(1, HKV, DIM, page_size=page_size, num_pages=NUM_PAGES, dtype=torch.float32, device="cpu")
    root = cache.add(5)
    kids = cache.fork(root, 2)
    cache.append(kids, 1)
    cache.release(root)
    plan = cache.plan(kids, 2, num_qo_heads=HQ)
    check_table(cache, plan, kids, 2)
    assert_equivalent(plan, table_plan(plan, page_size))
    copied = cache.path_slots(kids[1])[:5]
    assert not torch.equal(copied, cache.path_slots(kids[0])[:5])  # (the second sibling's copy is elsewhere)
