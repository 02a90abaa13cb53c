"""PrefixKVCache (a PrefixIndex wired to a TreeKVCache): a hypothesis state machine over requests (match,
prefill the rest, decode), finishing them into the cache, dropping them, evicting and clearing, on tiny
NaN-poisoned pools; plus the cache operations it needs (pin, fork_at, cut_back) and decode through a cached
prefix against the reference.

Every token's K/V rows are a function of its key and its whole prefix, so a match that crossed keys or
continued the wrong tokens reads rows that differ, and a read of an evicted (poisoned) page reads NaN.
"""

import math

import numpy as np
import pytest
import torch
from cache_model import DIM, DTYPE, HKV, HQ, LAYERS, make_cache, pool_views
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import treeattn
from treeattn import OutOfPages
from treeattn.prefix_cache import PrefixKVCache
from treeattn.prefix_index import canonical_key
from treeattn.testing import TOLERANCE, relative_error


class Rows:
    """K/V rows ``[LAYERS, HKV, DIM]`` per (key, token prefix): fresh random rows the first time."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.rows = {}

    def get(self, key, prefix):
        r = self.rows.get((key, prefix))
        if r is None:
            r = self.rows[(key, prefix)] = torch.randn(2, LAYERS, HKV, DIM, generator=self.g)
        return r

    def of(self, key, tokens, start, end, layer):
        """K and V rows ``[end - start, HKV, DIM]`` of positions [start, end) of ``tokens``."""
        rows = [self.get(key, tuple(tokens[: p + 1])) for p in range(start, end)]
        if not rows:
            return torch.zeros(0, HKV, DIM), torch.zeros(0, HKV, DIM)
        r = torch.stack(rows)
        return r[:, 0, layer], r[:, 1, layer]


def write_rows(cache, rows, key, tokens, start, slots):
    for layer in range(LAYERS):
        k, v = rows.of(key, tokens, start, start + slots.shape[0], layer)
        cache.write(layer, slots, k, v)


def read_rows(cache, slots, layer):
    k_cache, v_cache = pool_views(cache, layer)
    return k_cache.reshape(-1, HKV, DIM)[slots], v_cache.reshape(-1, HKV, DIM)[slots]


def assert_path_holds(cache, rows, key, tokens, slots):
    """``slots`` (a path's first ``len(slots)`` positions) hold the rows of ``tokens`` under ``key``."""
    for layer in range(LAYERS):
        k, v = read_rows(cache, slots, layer)
        ek, ev = rows.of(key, tokens, 0, slots.shape[0], layer)
        assert torch.equal(k, ek) and torch.equal(v, ev), "a path reads rows of other tokens, key or an evicted page"


def poison_free_pages(cache):
    free = cache.allocator.free_pages()
    if free:
        for layer in range(LAYERS):
            for view in pool_views(cache, layer):
                view[free] = float("nan")


def serve(pc, rows, key, tokens):
    """Match ``tokens`` under ``key`` and prefill the rest: returns (leaf, hit length, lock). Raises
    OutOfPages with the request undone."""
    cache = pc.cache
    hit = pc.match(key, tokens)
    try:
        if hit.leaf is None:
            leaf = pc.reserve(lambda: cache.add(len(tokens)))
            slots = cache.slots(leaf)
        else:
            leaf = hit.leaf
            slots = pc.reserve(lambda: cache.append([leaf], len(tokens) - hit.length))
    except OutOfPages:
        if hit.leaf is not None:
            cache.release(hit.leaf)
        pc.unlock(hit.lock)
        raise
    pc.count_prefill(len(tokens) - hit.length)
    write_rows(cache, rows, key, tokens, hit.length, slots)
    return leaf, hit.length, hit.lock


KEYS = [None, "a", ("t", 1)]
USER_KEY = {canonical_key(k): k for k in KEYS}


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.page_size = 3
        self.cache = make_cache(page_size=self.page_size, num_pages=9)
        self.pc = PrefixKVCache(self.cache)
        self.rows = Rows()
        self.live = {}  # leaf -> [key, tokens, lock]
        self.done = []  # (key, tokens) of finished sequences

    @rule(key=st.sampled_from(KEYS), base=st.integers(0, 3), extra=st.lists(st.integers(0, 2), min_size=1, max_size=7),
          cut=st.integers(0, 12))
    def request(self, key, base, extra, cut):
        # Prompts continue an earlier sequence (cut anywhere) or start fresh, over a tiny alphabet, so matches
        # end inside nodes and pages, and the same tokens appear under several keys.
        prev = self.done[base][1] if base < len(self.done) else []
        tokens = list(prev[:cut]) + extra
        used = self.cache.stats()["pages_used"]
        live = set(self.cache.tree.live_ids())
        cached = self.pc.index.stats()["cached_tokens"]
        evictable = self.pc.index.evictable_pages()
        try:
            leaf, hit, lock = serve(self.pc, self.rows, key, tokens)
        except OutOfPages:
            assert set(self.cache.tree.live_ids()) == live
            if self.pc.index.stats()["cached_tokens"] == cached:
                assert self.cache.stats()["pages_used"] == used
            else:  # evicting all that could be evicted did not make room (copies of shared partial pages)
                assert evictable
            return
        assert hit <= len(tokens) - 1
        self.live[leaf] = [key, tokens, lock]

    def cached_sequences(self) -> set:
        return {(n.key, tuple(self.pc.index.path_tokens(n).tolist())) for n in self.pc.index.nodes() if not n.children}

    @rule(key=st.sampled_from(KEYS), base=st.integers(0, 3), extra=st.lists(st.integers(0, 2), min_size=1, max_size=7),
          cut=st.integers(0, 12), decode=st.booleans())
    def failed_request(self, key, base, extra, cut, decode):
        """A request that fails once its prompt is cached (as a generate call's prompt step caches it), maybe
        after a decode step: the transaction takes out what it indexed and restores the counters."""
        prev = self.done[base][1] if base < len(self.done) else []
        tokens = list(prev[:cut]) + extra
        before, cached, live = self.pc.stats(), self.cached_sequences(), set(self.cache.tree.live_ids())

        class Failed(Exception):
            pass

        with pytest.raises((Failed, OutOfPages)):
            with self.pc.transaction():
                leaf, _, lock = serve(self.pc, self.rows, key, tokens)
                locks = [lock]
                try:
                    locks.append(self.pc.insert(key, tokens, leaf, lock=True)[1])
                    if decode:
                        self.pc.reserve(lambda: self.cache.append([leaf], 1))
                    raise Failed
                finally:
                    self.cache.release(leaf)
                    for held in locks:
                        self.pc.unlock(held)
        after = self.pc.stats()
        assert set(self.cache.tree.live_ids()) == live
        if after["evicted_tokens"] == before["evicted_tokens"]:  # (an entry it split stays split: the same tokens)
            assert {**after, "nodes": 0} == {**before, "nodes": 0} and self.cached_sequences() == cached
        else:  # (what was evicted to make room stays evicted)
            assert {k: after[k] for k in ("prompt_tokens", "hit_tokens", "prefill_tokens")} == \
                {k: before[k] for k in ("prompt_tokens", "hit_tokens", "prefill_tokens")}
            assert self.cached_sequences() <= cached

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 50), n=st.integers(1, 4))
    def decode(self, i, n):
        leaf = sorted(self.live)[i % len(self.live)]
        key, tokens, _ = self.live[leaf]
        new = [(len(tokens) * 7 + j) % 3 for j in range(n)]
        try:
            slots = self.pc.reserve(lambda: self.cache.append([leaf], n))
        except OutOfPages:
            return
        tokens.extend(new)
        write_rows(self.cache, self.rows, key, tokens, len(tokens) - n, slots)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 50), keep=st.booleans())
    def finish(self, i, keep):
        leaf = sorted(self.live)[i % len(self.live)]
        key, tokens, lock = self.live.pop(leaf)
        if keep:
            self.pc.insert(key, tokens, leaf)
            self.done.append((key, list(tokens)))
        self.cache.release(leaf)
        self.pc.unlock(lock)

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        before = self.pc.index.evictable_pages()
        ev = self.pc.evict(n)
        assert (ev.tokens > 0) == (0 < n <= before)

    @rule()
    def clear(self):
        self.pc.clear()
        assert self.pc.index.evictable_pages() == 0

    @invariant()
    def consistent(self):
        cache, tree, alloc = self.cache, self.cache.tree, self.cache.allocator
        refs = np.zeros(cache.num_pages, dtype=np.int64)
        for n in tree.node_ids():
            for p in tree.any_node(n).pages:
                refs[p] += 1
        assert refs.tolist() == [alloc.refcount(p) for p in range(cache.num_pages)]
        assert set(alloc.free_pages()) == set(np.nonzero(refs == 0)[0].tolist())
        # Every held page is read by a live or a cached (pinned) path; the index's pages are held.
        readers = set(tree.live_ids()) | set(tree._pins)
        read = {int(p) for n in readers for p in tree.path_pages(tree.any_node(n))}
        assert read == set(np.nonzero(refs)[0].tolist())
        assert set(self.pc.index._refs) <= set(np.nonzero(refs)[0].tolist()) | set(alloc.free_pages())
        poison_free_pages(cache)
        s = self.cache.page_size
        for leaf, (key, tokens, _) in self.live.items():
            slots = cache.path_slots(leaf)
            assert slots.shape[0] == len(tokens)
            assert_path_holds(cache, self.rows, key, tokens, slots)
        for n in self.pc.index.nodes():
            key = n.key
            node = tree.any_node(n.cache_node)
            assert node.id in tree._pins and node.end >= n.end
            pos = torch.arange(n.end)
            slots = torch.as_tensor(tree.path_pages(node), dtype=torch.int64)[pos // s] * s + pos % s
            tokens = self.pc.index.path_tokens(n).tolist()
            assert_path_holds(cache, self.rows, USER_KEY[n.key], tokens, slots)
        st_ = self.pc.stats()
        assert st_["pages_used"] + st_["pages_free"] == st_["num_pages"]


PrefixCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                                suppress_health_check=list(HealthCheck))
TestPrefixCacheMachine = PrefixCacheMachine.TestCase


def _attend(q, k, v, scale):
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v)


@pytest.mark.parametrize("page_size", [3, 4])
def test_decode_through_cached_prefixes_equals_the_reference(page_size):
    """Sequences continue cached prefixes (hits at every length, inside nodes and pages), decode one step
    together, and tree_decode over the shared, poisoned pool equals attention over each sequence's rows."""
    cache = make_cache(page_size=page_size, num_pages=40)
    pc, rows = PrefixKVCache(cache), Rows(seed=page_size)
    base = [5, 1, 2, 7, 3, 3, 0, 4, 6, 2, 1]
    leaf, _, lock = serve(pc, rows, "k", base)
    pc.insert("k", base, leaf)
    cache.release(leaf)
    pc.unlock(lock)
    live = {}
    for cut in range(1, len(base)):
        tokens = base[:cut] + [9, cut]
        leaf, hit, lock = serve(pc, rows, "k", tokens)
        assert hit == cut
        live[leaf] = ("k", tokens)
    leaf, hit, lock = serve(pc, rows, "other", base[:6] + [9])
    assert hit == 0
    live[leaf] = ("other", base[:6] + [9])
    poison_free_pages(cache)
    leaves = sorted(live)
    slots = cache.append(leaves)
    for leaf, s in zip(leaves, slots.split(1)):
        key, tokens = live[leaf]
        tokens.append(8)
        write_rows(cache, rows, key, tokens, len(tokens) - 1, s)
    plan = cache.plan(leaves, num_qo_heads=HQ)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(leaves), HQ, DIM, generator=g)
    scale = 1 / math.sqrt(DIM)
    for layer in range(LAYERS):
        out = treeattn.tree_decode(q, **cache.layer(layer), plan=plan, sm_scale=scale)
        assert not torch.isnan(out).any()
        for i, leaf in enumerate(leaves):
            key, tokens = live[leaf]
            k, v = rows.of(key, tokens, 0, len(tokens), layer)
            assert relative_error(out[i], _attend(q[i], k, v, scale)) < TOLERANCE[DTYPE]


def test_fork_at_cut_back_and_pins_misuse():
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(6)
    with pytest.raises(ValueError, match="position: expected"):
        cache.fork_at(root, 7)
    with pytest.raises(ValueError, match="position: expected"):
        cache.fork_at(root, 0)
    with pytest.raises(ValueError, match="fork_at: expected a node"):
        cache.fork_at(99, 1)
    with pytest.raises(ValueError, match="cut_back: expected a released"):
        cache.cut_back(root, 2)
    with pytest.raises(ValueError, match="unpin: expected a pinned node"):
        cache.unpin(root)
    mid = cache.fork_at(root, 5)  # one whole page shared, the cut page copied
    assert cache.length(mid) == 5 and cache.allocator.refcount(cache.tree.any_node(root).pages[0]) == 2
    cache.pin(root)
    cache.release(root)
    assert root in cache.tree  # pinned: cached
    assert cache.cut_back(root, 2) == 2  # (a child would keep it longer; none here)
    assert cache.tree.any_node(root).end == 2
    cache.unpin(root)
    assert root not in cache.tree
    cache.release(mid)
    assert cache.stats()["pages_used"] == 0


def test_out_of_pages_evicts_only_what_it_must():
    """A request that fits once cached leaves are evicted evicts the least recently used ones; one that
    would not fit even then evicts nothing and leaves the cache as it was."""
    cache = make_cache(page_size=2, num_pages=6)
    pc, rows = PrefixKVCache(cache), Rows()
    for first in (1, 2, 3):
        tokens = [first, 0, 0, 0]
        leaf, _, lock = serve(pc, rows, None, tokens)
        pc.insert(None, tokens, leaf)
        cache.release(leaf)
        pc.unlock(lock)
    assert cache.allocator.num_free == 0
    pc.match(None, [1, 0, 0, 0, 5])  # (a use: sequence 1 is now the most recently used; the lock is dropped)
    used = pc.stats()["pages_used"]
    with pytest.raises(OutOfPages):
        serve(pc, rows, None, [4] * 13)
    assert pc.stats()["pages_used"] == used and pc.stats()["evicted_tokens"] == 0
    leaf, _, lock = serve(pc, rows, None, [4] * 3)
    assert pc.stats()["evicted_tokens"] == 4  # sequence 2, the least recently used
    assert pc.match(None, [1, 0, 0, 0, 5]).length == 4 and pc.match(None, [2, 0, 0, 0, 5]).length == 0


def test_pages_a_live_reader_keeps_are_not_counted_as_freeable():
    """A cached sequence whose released node a live node still reads frees nothing when evicted: a request
    that only fits if it did raises OutOfPages with nothing evicted, rather than after losing entries."""
    cache = make_cache(page_size=2, num_pages=4)
    pc = PrefixKVCache(cache)
    root = cache.add(4)  # 2 pages
    kid = cache.fork(root, 1)[0]
    cache.append([kid], 2)  # 1 page; kid reads root's pages
    pc.insert("k", [1, 2, 3, 4], root)
    cache.release(root)
    other = cache.add(2)  # 1 page
    pc.insert("k", [9, 9], other)
    cache.release(other)
    assert cache.allocator.num_free == 0
    assert pc.index.evictable_pages() == 3 and pc.freeable_pages() == 1
    before = pc.stats()
    with pytest.raises(OutOfPages):
        pc.reserve(lambda: cache.add(6))  # 3 pages: only 1 can be freed
    assert pc.stats() == before and pc.match("k", [1, 2, 3, 4, 5]).length == 4
    leaf = pc.reserve(lambda: cache.add(2))  # 1 page: fits once the sequence no live node reads is evicted
    assert pc.match("k", [9, 9, 9]).length == 0 and cache.length(leaf) == 2
