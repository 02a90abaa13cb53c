"""TreeKVCache through its public methods: a hypothesis state machine against a plain model (one token list
per node, see cache_model.py), the write and page-copy kernels against the reference, planning, MLA, and every
misuse error. The pools are tiny and poisoned with NaN, so a stray read of a slot no path holds shows up.
"""

import math
from collections.abc import Mapping

import pytest
import torch
from cache_model import (
    DIM,
    DTYPE,
    HKV,
    HQ,
    LAYERS,
    Model,
    assert_unchanged,
    check_books,
    check_pool,
    live_path_pages,
    make_cache,
    poison,
    snapshot,
    write,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch.utils._python_dispatch import TorchDispatchMode

import treeattn
from treeattn import OutOfPages, TreeKVCache
from treeattn._dispatch import force
from treeattn.testing import PagedTable, assert_close


def _attend(q, k, v, scale):
    """Model attention: q [H, D] over k, v [L, Hkv, D] (fp32); empty KV gives 0."""
    if k.shape[0] == 0:
        return torch.zeros(q.shape[0], v.shape[-1])
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v)


def _table(plan, cache) -> PagedTable:
    """The paged table ``plan`` holds, over ``cache``'s pool."""
    return PagedTable(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, cache.page_size, cache.num_pages)


def _assert_shares_like_treeattn_plan(plan, cache):
    """The same table through treeattn.plan's own sharing discovery gives the same edges, items and bytes."""
    again = _table(plan, cache).plan(num_qo_heads=HQ, num_kv_heads=HKV)
    for key in ("unique_tokens", "naive_tokens", "planned_tokens", "trie_edges", "work_items", "partial_rows"):
        assert plan.stats[key] == again.stats[key], key


def _check_decode_against_model(cache, model, nodes, num_tokens, layer, seed):
    """tree_decode over cache.plan(nodes) and the cache's own pool equals attention over the model's
    sequences (the shared ``treeattn.testing.check_decode`` draws fresh caches, so it cannot check a pool);
    the plan shares as much as treeattn.plan finds on the same table."""
    plan = cache.plan(nodes, num_tokens, num_qo_heads=HQ)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(nodes) * num_tokens, HQ, DIM, generator=g)
    out, lse = treeattn.tree_decode(q, **cache.layer(layer), plan=plan, return_lse=True)
    scale = 1 / math.sqrt(DIM)
    expected = torch.zeros_like(out)
    for i, node in enumerate(nodes):
        for j in range(num_tokens):
            end = len(model.seq[node]) - (num_tokens - 1 - j)
            k, v = model.rows(model.seq[node][:end], layer)
            expected[i * num_tokens + j] = _attend(q[i * num_tokens + j], k, v, scale)
    assert not torch.isnan(out).any(), "NaN: a poisoned slot was read"
    assert_close(out, expected)  # (an all-zero expectation, every query empty, needs an all-zero out)
    empty = _table(plan, cache).empty_queries
    assert torch.isinf(lse[empty]).all()
    _assert_shares_like_treeattn_plan(plan, cache)


class TreeCacheMachine(RuleBasedStateMachine):
    """Random add/fork/append/write/release/plan sequences; the model is the oracle."""

    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(6, 20))
    def setup(self, page_size, num_pages):
        self.cache = make_cache(page_size, num_pages)
        self.model = Model()
        self.decodes = 0

    def _pick(self, data, nodes, label):
        return data.draw(st.sampled_from(sorted(nodes)), label=label)

    @rule(n=st.integers(0, 9))
    def add(self, n):
        need = -(-n // self.cache.page_size)
        free = self.cache.stats()["pages_free"]
        if need > free:
            snap = snapshot(self.cache)
            with pytest.raises(OutOfPages) as info:
                self.cache.add(n)
            assert (info.value.pages_needed, info.value.pages_free) == (need, free)
            assert_unchanged(self.cache, snap)
            return
        root = self.cache.add(n)
        ids = self.model.new_tokens(n)
        self.model.add_node(root, None, ids)
        write(self.cache, self.model, self.cache.slots(root), ids)

    @precondition(lambda self: self.model.live)
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        node = self._pick(data, self.model.live, "fork node")
        for kid in self.cache.fork(node, n):
            self.model.add_node(kid, node, list(self.model.seq[node]))

    @precondition(lambda self: self.model.leaves())
    @rule(data=st.data(), k=st.integers(1, 3))
    def append(self, data, k):
        leaves = data.draw(st.lists(st.sampled_from(self.model.leaves()), min_size=1, unique=True), label="leaves")
        s = self.cache.page_size
        ends = [len(self.model.seq[n]) for n in leaves]
        fresh = sum(-(-(e + k) // s) - -(-e // s) for e in ends)
        copies = sum(1 for e in ends if e % s)
        free = self.cache.stats()["pages_free"]
        snap = snapshot(self.cache)
        copied = self.cache.stats()["pages_copied"]
        try:
            slots = self.cache.append(leaves, k)
        except OutOfPages as err:
            event("append: OutOfPages")
            assert free < fresh + copies, "OutOfPages although the worst case fits"
            assert err.pages_free == free and fresh <= err.pages_needed <= fresh + copies and err.pages_needed > free
            assert_unchanged(self.cache, snap)
            return
        assert free >= fresh, "append succeeded without the pages it needs"
        if self.cache.stats()["pages_copied"] > copied:
            event("append: copy on write")
        assert slots.shape == (len(leaves) * k,) and slots.dtype == torch.int64
        ids = self.model.new_tokens(len(leaves) * k)
        write(self.cache, self.model, slots, ids)
        for i, node in enumerate(leaves):
            self.model.seq[node] = self.model.seq[node] + ids[i * k : (i + 1) * k]

    @precondition(lambda self: any(self.model.own_range(n)[1] > self.model.own_range(n)[0]
                                   for n in self.model.leaves()))
    @rule(data=st.data())
    def rewrite(self, data):
        """Overwrite a leaf's own tokens with new values (nothing else holds a copy of a leaf's own slots)."""
        leaf = self._pick(data, [n for n in self.model.leaves() if len(set(self.model.own_range(n))) == 2], "leaf")
        slots = self.cache.slots(leaf)
        ids = self.model.new_tokens(slots.numel())
        write(self.cache, self.model, slots, ids)
        self.model.seq[leaf] = self.model.seq[leaf][: len(self.model.seq[leaf]) - len(ids)] + ids

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def release(self, data):
        node = self._pick(data, self.model.live, "release node")
        self.cache.release(node)
        self.model.release(node)
        if node in self.model.seq:
            event("release: node stays for its descendants")

    @precondition(lambda self: self.model.leaves())
    @rule(data=st.data(), ways=st.integers(1, 3), k=st.integers(1, 2))
    def beam_step(self, data, ways, k):
        """Beam search's step: fork a leaf, release it, grow the children, drop some of them. The pages used
        stay those the live paths read (checked by the invariants)."""
        leaf = self._pick(data, self.model.leaves(), "beam leaf")
        kids = self.cache.fork(leaf, ways)
        for kid in kids:
            self.model.add_node(kid, leaf, list(self.model.seq[leaf]))
        self.cache.release(leaf)
        self.model.release(leaf)
        try:
            slots = self.cache.append(kids, k)
        except OutOfPages:
            event("beam_step: OutOfPages")
            return
        ids = self.model.new_tokens(len(kids) * k)
        write(self.cache, self.model, slots, ids)
        for i, kid in enumerate(kids):
            self.model.seq[kid] = self.model.seq[kid] + ids[i * k : (i + 1) * k]
        for kid in data.draw(st.lists(st.sampled_from(kids), max_size=ways - 1, unique=True), label="beams dropped"):
            self.cache.release(kid)
            self.model.release(kid)

    @precondition(lambda self: self.model.live and self.decodes < 3)
    @rule(data=st.data(), num_tokens=st.sampled_from([1, 1, 2]), layer=st.integers(0, LAYERS - 1))
    def decode(self, data, num_tokens, layer):
        candidates = [n for n in sorted(self.model.live) if len(self.model.seq[n]) >= num_tokens]
        if not candidates:
            return
        nodes = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=6), label="plan nodes")
        self.decodes += 1
        event(f"decode: num_tokens={num_tokens}")
        _check_decode_against_model(self.cache, self.model, nodes, num_tokens, layer, seed=self.decodes)

    @precondition(lambda self: self.model.live)
    @rule(data=st.data(), case=st.integers(0, 9))
    def misuse(self, data, case):
        """Every misuse raises a clear error and changes nothing."""
        cache, model = self.cache, self.model
        node = self._pick(data, model.live, "node")
        snap = snapshot(cache)
        slots = torch.zeros(2, dtype=torch.int64)
        rows = torch.zeros(2, HKV, DIM)
        if case == 0 and model.released:
            gone = self._pick(data, model.released, "released")
            calls = (cache.release, lambda n: cache.fork(n, 1), cache.append, cache.plan, cache.slots,
                     cache.path_slots)
            for call in calls:
                with pytest.raises(ValueError, match=f"node {gone} was released"):
                    call(gone)
        elif case == 1 and model.children[node]:
            with pytest.raises(ValueError, match="has children"):
                cache.append([node])
        elif case == 2:
            with pytest.raises(ValueError, match="layer"):
                cache.write(LAYERS, slots, rows, rows)
            with pytest.raises(ValueError, match="layer"):
                cache.layer(-1)
        elif case == 3:
            with pytest.raises(ValueError, match="k: expected shape"):
                cache.write(0, slots, torch.zeros(3, HKV, DIM), rows)
            with pytest.raises(ValueError, match="v: expected shape"):
                cache.write(0, slots, rows, torch.zeros(2, HKV, DIM + 1))
        elif case == 4:
            with pytest.raises(ValueError, match="dtype"):
                cache.write(0, slots, rows.half(), rows.half())
            with pytest.raises(ValueError, match="slots"):
                cache.write(0, slots.int(), rows, rows)
            with pytest.raises(ValueError, match="v: expected a tensor"):
                cache.write(0, slots, rows)
        elif case == 5 and not model.children[node]:
            with pytest.raises(ValueError, match="twice"):
                cache.append([node, node])
        elif case == 6:
            with pytest.raises(ValueError, match="unknown node"):
                cache.fork(10**6, 1)
            with pytest.raises(ValueError, match="expected an int"):
                cache.append([node], 0)
        elif case == 7:
            with pytest.raises(OutOfPages) as info:
                cache.add(cache.num_pages * cache.page_size + 1)
            assert info.value.pages_needed == cache.num_pages + 1
            assert info.value.pages_free == cache.stats()["pages_free"]
            assert isinstance(info.value, RuntimeError)
        elif case == 8:
            with pytest.raises(ValueError, match="fewer than num_tokens"):
                cache.plan([node], max(2, len(model.seq[node]) + 1))
        assert_unchanged(cache, snap)

    @invariant()
    def books_balance(self):
        if hasattr(self, "cache"):
            check_books(self.cache, self.model)

    @invariant()
    def paths_read_back(self):
        if hasattr(self, "cache"):
            check_pool(self.cache, self.model)

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        for node in sorted(self.model.live):
            self.cache.release(node)
            self.model.release(node)
        check_books(self.cache, self.model)
        stats = self.cache.stats()
        assert stats["pages_free"] == self.cache.num_pages and stats["nodes"] == 0
        assert sorted(self.cache.allocator.free_pages()) == list(range(self.cache.num_pages))


TreeCacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_tree_cache_state_machine = TreeCacheMachine.TestCase


# ---- kernels against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("mla", [False, True])
def test_kv_write_matches_reference(mla):
    g = torch.Generator().manual_seed(0)
    planes, row = (1, (24,)) if mla else (2, (3, 16))
    pool = torch.randn(planes, 2, 5, 4, *row, generator=g)
    slots = torch.tensor([7, 0, -1, 19, 12], dtype=torch.int64)
    # Non-contiguous rows (a head-strided view) exercise the source strides.
    k = torch.randn(5, *row[:-1], 2 * row[-1], generator=g)[..., ::1][..., : row[-1]]
    v = None if mla else torch.randn(5, *row, generator=g)
    want, got = pool.clone(), pool.clone()
    with force("reference"):
        torch.ops.treeattn.kv_write_run(slots, k, v, want, 1)
    with force("triton"):
        torch.ops.treeattn.kv_write_run(slots, k, v, got, 1)
    assert torch.equal(want, got)
    flat = got[0, 1].flatten(0, 1)
    assert torch.equal(flat[19], k[3]) and torch.equal(got[:, 0], pool[:, 0])


def test_copy_pages_matches_reference():
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(2, 3, 6, 4, 2, 16, generator=g)
    src, dst, n = torch.tensor([0, 2, 2]), torch.tensor([5, 1, 3]), torch.tensor([3, 1, 4])
    want, got = pool.clone(), pool.clone()
    with force("reference"):
        torch.ops.treeattn.copy_pages_run(want, src, dst, n)
    with force("triton"):
        torch.ops.treeattn.copy_pages_run(got, src, dst, n)
    assert torch.equal(want, got)
    assert torch.equal(got[:, :, 5, :3], pool[:, :, 0, :3]) and torch.equal(got[:, :, 5, 3], pool[:, :, 5, 3])


class _RecordCopies(TorchDispatchMode):
    """Records the number of copies of every copy_pages launch made while active."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.treeattn.copy_pages_run.default:
            self.copies.append(args[1].numel())
        return func(*args, **(kwargs or {}))


def test_append_copies_on_write_in_one_launch():
    cache, model = make_cache(page_size=4, num_pages=32), Model()
    root = cache.add(6)
    ids = model.new_tokens(6)
    model.add_node(root, None, ids)
    write(cache, model, cache.slots(root), ids)
    kids = cache.fork(root, 4)
    for kid in kids:
        model.add_node(kid, root, list(ids))
    with _RecordCopies() as record:
        slots = cache.append(kids, 3)
    # The first child continues the shared half-full page in place; the other three copy it, in one launch.
    assert record.copies == [3]
    assert cache.stats()["pages_copied"] == 3
    new = model.new_tokens(12)
    write(cache, model, slots, new)
    for i, kid in enumerate(kids):
        model.seq[kid] = ids + new[3 * i : 3 * i + 3]
    check_pool(cache, model)
    check_books(cache, model)


def test_release_reopens_a_page_continued_in_place():
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(2)
    a, b = cache.fork(root, 2)
    cache.append([a])  # continues root's page in place
    cache.release(a)
    cache.append([b])  # the slots a claimed are free again: b continues in place too, no copy
    assert cache.stats()["pages_copied"] == 0 and cache.stats()["pages_used"] == 1


def test_released_parent_lives_while_children_need_it():
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(5)
    (kid,) = cache.fork(root, 1)
    cache.append([kid], 4)
    cache.release(root)
    assert cache.stats()["pages_used"] == 3 and cache.stats()["nodes"] == 2 and cache.stats()["live_nodes"] == 1
    assert cache.path_slots(kid).shape[0] == 9
    cache.release(kid)
    assert cache.stats()["pages_free"] == 8 and cache.stats()["nodes"] == 0



def test_pages_do_not_leak_in_beam_style_use():
    """Fork a leaf in two, release it, append to both, release one child, repeat: each released ancestor's tail
    page used to stay allocated after the surviving child copied it (OutOfPages at step 7 on 8 pages). Now a
    page no live path reads is freed, and the one live row never holds more than its path's pages."""
    c = treeattn.TreeKVCache(1, 1, 16, page_size=16, num_pages=8, dtype=torch.float32, device="cpu")
    leaf = c.add(5)
    for _ in range(40):
        x, y = c.fork(leaf, 2)
        c.release(leaf)
        c.append([x, y])
        c.release(x)
        leaf = y
        assert c.stats()["pages_used"] == -(-c.length(leaf) // 16) == len(live_path_pages(c))
    check_books(c)
    assert c.length(leaf) == 45 and c.stats()["live_nodes"] == 1 and c.stats()["pages_used"] == 3


def test_beam_steps_keep_paths_and_causal_plans_exact():
    """Beam steps over a NaN-poisoned pool: the survivors read their whole sequences back, and plans with
    several query tokens per leaf (whose first queries reach back into tokens a released ancestor gave to the
    leaf's copy of its page) equal attention over the model's sequences."""
    cache, model = make_cache(page_size=4, num_pages=24), Model()
    root = cache.add(6)
    ids = model.new_tokens(6)
    model.add_node(root, None, ids)
    write(cache, model, cache.slots(root), ids)
    beams = [root]
    for step in range(9):
        nxt = []
        for beam in beams:
            kids = cache.fork(beam, 2)
            for kid in kids:
                model.add_node(kid, beam, list(model.seq[beam]))
            cache.release(beam)
            model.release(beam)
            nxt += kids
        slots = cache.append(nxt, 1 + step % 2)
        k = 1 + step % 2
        new = model.new_tokens(len(nxt) * k)
        write(cache, model, slots, new)
        for i, kid in enumerate(nxt):
            model.seq[kid] = model.seq[kid] + new[i * k : (i + 1) * k]
        beams = nxt[::2][:3]  # keep at most three beams, drop the rest
        for kid in set(nxt) - set(beams):
            cache.release(kid)
            model.release(kid)
        check_books(cache, model)
        check_pool(cache, model)
        _check_decode_against_model(cache, model, beams, 3, step % LAYERS, seed=step)
    assert cache.stats()["pages_used"] == len(live_path_pages(cache)) <= 3 * -(-len(model.seq[beams[0]]) // 4)

# ---- planning ---------------------------------------------------------------------------------------


def _grow(cache, model, node, n):
    slots = cache.append([node], n)
    ids = model.new_tokens(n)
    write(cache, model, slots, ids)
    model.seq[node] = model.seq[node] + ids


def _tree(page_size, prompt, fanout, tokens):
    """A prompt, then levels of forks; every new node gets ``tokens[l]`` tokens."""
    cache, model = make_cache(page_size=page_size, num_pages=256), Model()
    root = cache.add(prompt)
    ids = model.new_tokens(prompt)
    model.add_node(root, None, ids)
    write(cache, model, cache.slots(root), ids)
    frontier = [root]
    for ways, n in zip(fanout, tokens):
        nxt = []
        for node in frontier:
            for kid in cache.fork(node, ways):
                model.add_node(kid, node, list(model.seq[node]))
                if n:
                    _grow(cache, model, kid, n)
                nxt.append(kid)
        frontier = nxt
    return cache, model, frontier


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_best_of_n_plan_and_stats(page_size):
    cache, model, leaves = _tree(page_size, 37, [6], [5])
    _check_decode_against_model(cache, model, leaves, 1, 1, seed=3)
    stats = cache.stats()
    prompt_pages = -(-37 // page_size)
    assert stats["tokens_stored"] == 37 + 6 * 5 and stats["tokens_if_unshared"] == 6 * 42
    assert stats["pages_if_unshared"] == 6 * -(-42 // page_size)
    assert stats["pages_used"] < stats["pages_if_unshared"] and stats["memory_saved"] > 0
    assert stats["pages_used"] <= prompt_pages + 6 * -(-5 // page_size) + 6


def test_speculative_draft_tree_of_one_token_nodes():
    """A draft tree of 1-token nodes: every draft node is a query attending its ancestors and itself."""
    cache, model, _ = _tree(4, 10, [], [])
    root = next(iter(model.live))
    drafts, frontier = [], [root]
    for ways in (2, 2, 1):
        nxt = []
        for node in frontier:
            for kid in cache.fork(node, ways):
                model.add_node(kid, node, list(model.seq[node]))
                _grow(cache, model, kid, 1)
                nxt.append(kid)
        drafts += nxt
        frontier = nxt
    _check_decode_against_model(cache, model, drafts, 1, 0, seed=4)
    _check_decode_against_model(cache, model, [root] + drafts[::-1], 1, 1, seed=5)


def test_plan_several_query_tokens_per_leaf_and_empty_queries():
    cache, model, leaves = _tree(4, 6, [3, 2], [3, 2])
    _check_decode_against_model(cache, model, leaves, 3, 0, seed=6)  # causal: token j attends up to itself
    # duplicates, reaching into ancestors
    _check_decode_against_model(cache, model, leaves[:2] + leaves[:1], 5, 1, seed=7)
    empty_root = cache.add(0)
    model.add_node(empty_root, None, [])
    (child,) = cache.fork(empty_root, 1)
    model.add_node(child, empty_root, [])
    _check_decode_against_model(cache, model, [empty_root, leaves[0], child], 1, 0, seed=8)  # empty KV: 0 and -inf


def test_plan_of_forked_children_before_append():
    cache, model, leaves = _tree(4, 7, [2, 3], [2, 0])  # the last level is forked, not appended yet
    _check_decode_against_model(cache, model, leaves, 1, 0, seed=9)


def test_mla_cache():
    cache = TreeKVCache.mla(2, kv_lora_rank=32, rope_dim=16, page_size=4, num_pages=16, dtype=DTYPE, device="cpu")
    poison(cache)
    assert cache.layer(1).kv_cache.shape == (16, 4, 48) and list(cache.layer(1)) == ["kv_cache"]
    g = torch.Generator().manual_seed(10)
    root = cache.add(6)
    rows = {}
    for layer in range(2):
        rows[layer] = torch.randn(6, 48, generator=g)
        cache.write(layer, cache.slots(root), rows[layer])
    kids = cache.fork(root, 3)
    slots = cache.append(kids, 2)
    for layer in range(2):
        new = torch.randn(6, 48, generator=g)
        cache.write(layer, slots, new)
        rows[layer] = (rows[layer], new)
    with pytest.raises(ValueError, match="one latent row"):
        cache.write(0, slots, new, new)
    with pytest.raises(ValueError, match="kv: expected shape"):
        cache.write(0, slots, torch.zeros(6, 47))
    plan = cache.plan(kids, num_qo_heads=16)
    q = torch.randn(3, 16, 48, generator=g)
    out = treeattn.mla_tree_decode(q, **cache.layer(1), plan=plan, sm_scale=0.1, v_head_dim=32)
    prompt, new = rows[1]
    for i in range(3):
        kv = torch.cat([prompt, new[2 * i : 2 * i + 2]])
        p = torch.softmax(q[i] @ kv.T * 0.1, dim=-1)
        assert_close(out[i], p @ kv[:, :32])


_POOLS = {
    "fp32": dict(keys=["k_cache", "v_cache"]),
    "fp8": dict(keys=["k_cache", "v_cache", "k_scale", "v_scale"], dtype=torch.float8_e4m3fn),
    "mla": dict(keys=["kv_cache"], mla=True),
    "mla_fp8": dict(keys=["kv_cache", "kv_scale"], mla=True, dtype=torch.float8_e4m3fn),
}


@pytest.mark.parametrize("pool", list(_POOLS))
def test_layer_is_one_mapping_for_every_pool(pool):
    """cache.layer(i) is a read-only mapping keyed by the decode op's keyword names, so one idiom,
    tree_decode(q, **cache.layer(i), plan=plan) (mla_tree_decode for MLA), fits every pool; it equals the
    reference on the same views."""
    spec = _POOLS[pool]
    dtype = spec.get("dtype", DTYPE)
    fp8 = dtype != DTYPE
    g = torch.Generator().manual_seed(11)
    if spec.get("mla"):
        cache = TreeKVCache.mla(2, kv_lora_rank=32, rope_dim=16, page_size=4, num_pages=16, dtype=dtype, device="cpu",
                                kv_scale=0.05 if fp8 else None)
        row = (48,)
    else:
        cache = TreeKVCache(2, HKV, DIM, page_size=4, num_pages=16, dtype=dtype, device="cpu",
                            k_scale=torch.tensor([0.02, 0.03]) if fp8 else None, v_scale=0.04 if fp8 else None)
        row = (HKV, DIM)
    root = cache.add(7)
    leaves = cache.fork(root, 3)
    for grow in (lambda: cache.slots(root), lambda: cache.append(leaves, 2)):  # write the prompt, then copy it
        slots = grow()
        for i in range(2):
            cache.write(i, slots, *(torch.randn(slots.numel(), *row, generator=g) for _ in range(2 - cache.is_mla)))
    plan = cache.plan(leaves, num_qo_heads=4)
    layer = cache.layer(1)
    assert isinstance(layer, treeattn.KVLayer) and isinstance(layer, Mapping) and list(layer) == spec["keys"]
    assert all(layer[name] is getattr(layer, name) for name in layer)
    first = spec["keys"][0]
    assert layer[first].data_ptr() == cache.layer(1)[first].data_ptr() != cache.layer(0)[first].data_ptr()
    with pytest.raises(TypeError):
        layer["k_cache"] = None
    with pytest.raises(AttributeError, match="read-only"):
        layer.k_cache = None
    with pytest.raises(AttributeError, match="no 'scale'"):
        _ = layer.scale
    q = torch.randn(3, 4, row[-1], generator=g)
    table = _table(plan, cache)
    if cache.is_mla:
        out = treeattn.mla_tree_decode(q, **cache.layer(1), plan=plan, sm_scale=0.2, v_head_dim=32)
        ref, _ = table.reference(q, layer["kv_cache"], sm_scale=0.2, v_head_dim=32, kv_scale=layer.get("kv_scale"))
    else:
        out = treeattn.tree_decode(q, **cache.layer(1), plan=plan)
        ref, _ = table.reference(q, layer["k_cache"], layer["v_cache"],
                                 k_scale=layer.get("k_scale"), v_scale=layer.get("v_scale"))
    assert_close(out, ref, DTYPE)


def test_constructor_and_arguments_are_checked():
    with pytest.raises(ValueError, match="num_pages"):
        TreeKVCache(1, 1, 16, num_pages=0, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        TreeKVCache(1, 1, 16, num_pages=4, dtype=torch.int32, device="cpu")
    cache = make_cache()
    with pytest.raises(ValueError, match="num_tokens"):
        cache.add(-1)
    with pytest.raises(ValueError, match="expected a node"):
        cache.fork("root", 1)
    root = cache.add(3)
    with pytest.raises(ValueError, match="n: expected"):
        cache.fork(root, -1)
    assert cache.fork(root, 0) == []
    assert "TreeKVCache(num_layers=2" in repr(cache)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 4)), min_size=1, max_size=12), st.sampled_from([1, 4, 16]))
def test_plan_equals_treeattn_plan_on_random_forests(ops, page_size):
    """Random forests (grown without decoding): cache.plan shares exactly what treeattn.plan finds."""
    cache = TreeKVCache(1, HKV, DIM, page_size=page_size, num_pages=4096, dtype=DTYPE, device="cpu")
    nodes = [cache.add(5)]
    for pick, n in ops:
        node = nodes[pick % len(nodes)]
        if cache.tree.node(node).children:
            nodes += cache.fork(node, 1)
        else:
            cache.append([node], n)
            nodes += cache.fork(node, n % 3)
    plan = cache.plan(nodes, num_qo_heads=HQ)
    _assert_shares_like_treeattn_plan(plan, cache)
    for i, node in enumerate(nodes):
        row = plan.kv_indices[plan.kv_indptr[i] : plan.kv_indptr[i + 1]].long()
        slots = (row[:, None] * page_size + torch.arange(page_size)).reshape(-1)[: cache.length(node)]
        assert slots.tolist() == cache.path_slots(node).tolist()


def test_plan_walk_is_reused_only_while_it_holds():
    """A decode loop plans the same nodes every step, so the tree keeps the subtree they reach between calls.
    Each walk equals one gathered afresh, through growth across page ends, forks, releases, queries on internal
    nodes, several tokens per node and nodes that start empty (their queries change owner)."""
    cache = make_cache(page_size=4, num_pages=256)
    tree = cache.tree
    root = cache.add(6)
    leaves = cache.fork(root, 3)

    def reused(nodes, num_tokens=1):
        """Plans ``nodes``; whether the walk was the previous call's."""
        node_list = tree.nodes(nodes, "plan")
        walk = tree.plan_walk(node_list, num_tokens)
        fresh = tree.plan_walk(node_list, num_tokens, reuse=False)
        assert walk[:6] == fresh[:6] and not fresh.reused
        cache.plan(nodes, num_tokens, num_qo_heads=HQ)
        return walk.reused

    assert not reused(leaves) and not reused(leaves)  # empty leaves: their queries belong to the root until they grow
    cache.append(leaves, 2)
    assert not reused(leaves)
    for _ in range(7):
        cache.append(leaves)
        assert reused(leaves)  # across steps, also past page ends
    assert not reused(leaves, 3)
    assert not reused(leaves)
    kids = cache.fork(leaves[0], 2)
    assert reused(leaves)  # forking a planned node keeps the walk up from it valid
    cache.append(kids[:1], 5)
    assert not reused([root, leaves[0], kids[0], kids[1]])  # internal nodes and an empty one
    assert not reused([root, leaves[0], kids[0], kids[1]])  # (the empty one's query is its parent's)
    cache.release(leaves[2])
    with pytest.raises(ValueError, match="was released"):
        cache.plan(leaves)
    assert not reused(leaves[:2] + kids)


def test_write_and_decode_under_torch_compile():
    """A layer's step (cache.write + tree_decode) traces in one graph: the write op has a fake impl."""
    cache = make_cache(page_size=4, num_pages=16)
    root = cache.add(6)
    cache.write(0, cache.slots(root), torch.randn(6, HKV, DIM), torch.randn(6, HKV, DIM))
    kids = cache.fork(root, 3)
    slots = cache.append(kids)
    plan = cache.plan(kids, num_qo_heads=HQ)
    q, k, v = torch.randn(3, HQ, DIM), torch.randn(3, HKV, DIM), torch.randn(3, HKV, DIM)

    def step(q, k, v, slots):
        cache.write(0, slots, k, v)
        return treeattn.tree_decode(q, **cache.layer(0), plan=plan)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, slots)
    assert torch.equal(cache.layer(0).v_cache.reshape(-1, HKV, DIM)[slots], v)
    assert torch.equal(out, step(q, k, v, slots))


# ---- GPU: the CUDA and Triton write kernels, a bf16 cache, CUDA-graph capture -----------------------

GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("row", [(8, 128), (3, 100), (576,), (17,)])
def test_kv_write_gpu(backend, dtype, row):
    g = torch.Generator(device="cuda").manual_seed(0)
    planes = 2 if len(row) == 2 else 1
    pool = torch.randn(planes, 3, 7, 16, *row, device="cuda", generator=g).to(dtype)
    n = 37
    slots = torch.randperm(7 * 16, device="cuda", generator=g)[:n]
    slots[5] = -1
    slots[6], slots[7] = 7 * 16, 2**40  # outside the layer: skipped (7 * 16 would be the next layer's page 0)
    k = torch.randn(n, *row[:-1], row[-1] + 8, device="cuda", generator=g).to(dtype)[..., : row[-1]]  # strided rows
    v = torch.randn(n, *row, device="cuda", generator=g).to(dtype) if planes == 2 else None
    want, got = pool.clone(), pool.clone()
    with force("reference"):
        torch.ops.treeattn.kv_write_run(slots, k, v, want, 2)
    with force(backend):
        torch.ops.treeattn.kv_write_run(slots, k, v, got, 2)
    torch.cuda.synchronize()
    assert torch.equal(want, got)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cache_decode_and_cuda_graph_gpu(backend):
    """A bf16 best-of-N step on the GPU: append, write, plan, tree_decode vs the reference; then the step's
    write + tree_decode captured in a CUDA graph and replayed with new K/V."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    cache = TreeKVCache(2, 8, 128, page_size=16, num_pages=512, dtype=dt, device=dev)
    root = cache.add(1000)
    prompt = cache.slots(root)
    for layer in range(2):
        cache.write(layer, prompt, *(torch.randn(1000, 8, 128, device=dev, dtype=dt) for _ in range(2)))
    leaves = cache.fork(root, 16)
    for _ in range(3):
        slots = cache.append(leaves)
        for layer in range(2):
            cache.write(layer, slots, *(torch.randn(16, 8, 128, device=dev, dtype=dt) for _ in range(2)))
    assert cache.stats()["pages_copied"] == 15
    plan = cache.plan(leaves, num_qo_heads=32)
    q = torch.randn(16, 32, 128, device=dev, dtype=dt)
    k_new, v_new = (torch.randn(16, 8, 128, device=dev, dtype=dt) for _ in range(2))
    out = torch.empty_like(q)
    with force(backend if backend == "triton" else None):

        def step():
            cache.write(1, slots, k_new, v_new)
            treeattn.tree_decode(q, **cache.layer(1), plan=plan, out=out)

        step()  # warm up (compiles, allocates the plan's workspace)
        ref, _ = _table(plan, cache).reference(q, *cache.layer(1).values())
        assert_close(out, ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        graph.replay()
        torch.cuda.synchronize()
    k_cache, v_cache = cache.layer(1).values()
    assert torch.equal(k_cache.reshape(-1, 8, 128)[slots], k_new)
    ref, _ = _table(plan, cache).reference(q, k_cache, v_cache)
    assert_close(out, ref)


# ---- a step's writer: every layer's write of one slot tensor ----------------------------------------------


@pytest.mark.parametrize("kind", ["gqa", "mla", "fp8"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_writer_writes_what_write_writes(kind, backend):
    """``cache.writer(slots)(layer, ...)`` for every layer leaves the pool as ``cache.write(layer, slots, ...)``
    does, also with rows of another layout part-way (strided views, then contiguous rows again)."""
    g = torch.Generator().manual_seed(7)
    if kind == "mla":
        def make():
            return TreeKVCache.mla(3, kv_lora_rank=24, rope_dim=8, page_size=4, num_pages=9, dtype=DTYPE, device="cpu")
        row, planes = (32,), 1
    else:
        options = dict(dtype=torch.float8_e4m3fn, k_scale=0.5, v_scale=torch.tensor([0.25, 2.0])) if kind == "fp8" \
            else dict(dtype=DTYPE)

        def make():
            return TreeKVCache(3, HKV, DIM, page_size=4, num_pages=9, device="cpu", **options)
        row, planes = (HKV, DIM), 2
    mine, theirs = make(), make()
    with force(backend):
        for cache in (mine, theirs):
            cache._pool.zero_()
            roots = [cache.add(n) for n in (5, 3)]
            cache.append(roots)
            slots = cache.append(roots, 2)
        writer = mine.writer(slots)
        for i, layer in enumerate((0, 2, 1, 0)):
            # the third write: strided rows (every other row of a larger batch), another layout; then contiguous
            step = 2 if i == 2 else 1
            rows = [torch.randn(step * len(slots), *row, generator=g)[::step] for _ in range(planes)]
            writer(layer, *rows)
            theirs.write(layer, slots, *rows)
    assert writer.slots is slots
    assert torch.equal(mine._pool.view(torch.uint8), theirs._pool.view(torch.uint8))
    assert mine._pool.view(torch.uint8).any()


def test_writer_checks_like_write():
    """The writer's errors are write's: its slots when it is made, a bad layer or rows on any call (also after
    a prepared call, and with the layout of the prepared rows but another dtype); a failing call writes nothing.
    Slots changed in place (a new version) during the step are checked again."""
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(5)
    with pytest.raises(ValueError, match=r"slots: expected values < 32 \(num_pages \* page_size.*got 32"):
        cache.writer(torch.tensor([3, 32]))
    with pytest.raises(ValueError, match="slots: expected a 1-D torch.int64 tensor"):
        cache.writer(torch.tensor([3.0]))
    slots = cache.slots(root)
    writer = cache.writer(slots)
    k, v = torch.randn(5, HKV, DIM), torch.randn(5, HKV, DIM)
    writer(0, k, v)
    before = snapshot(cache)
    for layer in (LAYERS, -1, 0.0, True):
        with pytest.raises((ValueError, TypeError), match="layer: expected an int"):
            writer(layer, k, v)
    with pytest.raises(ValueError, match=r"k: expected shape \[5, 2, 16\]"):
        writer(1, k[:4], v)
    with pytest.raises(ValueError, match=r"v: expected dtype torch.float32 \(the cache's\), got torch.float16"):
        writer(1, k, v.half())
    with pytest.raises(ValueError, match="v: expected a tensor"):
        writer(1, k)
    assert_unchanged(cache, before)
    writer(1, k, v)  # the prepared layout again
    assert torch.equal(cache.layer(1).v_cache.reshape(-1, HKV, DIM)[:5], v)
    slots[2] = 32  # in place: a new version, checked again before the next write
    before = snapshot(cache)
    with pytest.raises(ValueError, match="slots: expected values < 32"):
        writer(0, k, v)
    assert_unchanged(cache, before)
