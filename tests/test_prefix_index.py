"""treeattn.prefix_index.PrefixIndex: unit cases (token-granular matches, isolation keys, page accounting of
shared partial pages, errors that change nothing) and a hypothesis state machine against a brute-force model
(a set of cached token sequences per key) driving a small fake paged cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from treeattn import TreeKVCache
from treeattn.prefix_index import Eviction, Match, PrefixIndex, Segment, cache_path


def snapshot(index: PrefixIndex):
    """Everything observable about an index (to check that a failing call changed nothing)."""
    nodes = [(n.serial, n.cache_node, n.start, n.end, n.tokens.tolist(), n.pages, n.hidden, n.locks, n.stamp)
             for n in index.nodes()]
    return nodes, index.stats()


def one_node(index, key, tokens, node, first_page=0):
    """Insert ``tokens`` as one fresh cache node holding fresh pages ``first_page, first_page + 1, ...``."""
    n = -(-len(tokens) // index.page_size)
    return index.insert(key, tokens, [Segment(node, 0, len(tokens), tuple(range(first_page, first_page + n)))])


# ---- matches ------------------------------------------------------------------------------------------


def test_match_is_token_granular_and_leaves_the_last_token():
    ix = PrefixIndex(page_size=4)
    one_node(ix, "k", [5, 6, 7, 8, 9, 10], node=3)
    m = ix.match("k", [5, 6, 7, 1])  # ends inside a page and inside the node
    assert (m.node, m.length) == (3, 3) and m.entry.cache_node == 3
    assert ix.match("k", [5, 6, 7, 8, 9, 10]).length == 5  # a full hit still computes the last token
    assert ix.match("k", [5, 6, 7, 8, 9, 10, 11]).length == 6
    assert ix.match("k", [5]).length == 0 and ix.match("k", []).length == 0
    assert ix.match("k", [4, 6]) == Match(None, 0, None)
    stats = ix.stats()
    assert stats["prompt_tokens"] == 4 + 6 + 7 + 1 + 0 + 2 and stats["hit_tokens"] == 3 + 5 + 6


def test_match_walks_a_split_tree_and_inputs_of_every_kind():
    ix = PrefixIndex(page_size=2)
    one_node(ix, None, [1, 2, 3, 4], node=0)
    one_node(ix, None, [1, 2, 9, 9, 9], node=1, first_page=10)
    one_node(ix, None, [1, 2, 3, 4, 5, 6], node=2, first_page=20)
    assert ix.match(None, [1, 2, 9, 9, 9, 0]).node == 1
    for toks in ([1, 2, 3, 4, 5, 0], np.array([1, 2, 3, 4, 5, 0], dtype=np.uint16), torch.tensor([1, 2, 3, 4, 5, 0])):
        m = ix.match(None, toks)
        assert (m.node, m.length) == (2, 5)
    assert ix.match(None, [1, 2, 3, 7]).length == 3 and ix.match(None, [1, 2, 3, 7]).node == 0


ADVERSARIAL_KEYS = [None, "", b"", 0, False, "0", 1, True, "1", (1,), (True,), ("1",), (), ((),), (None,), ("",),
                    ("a", 1), ("a", True), ("a", (1,))]


def test_keys_never_cross():
    ix = PrefixIndex(page_size=1)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    for i, key in enumerate(ADVERSARIAL_KEYS):
        if i % 2 == 0:  # every other key holds the same tokens, on its own cache node
            one_node(ix, key, tokens, node=i, first_page=100 * i)
    for i, key in enumerate(ADVERSARIAL_KEYS):
        m = ix.match(key, tokens + [0])
        assert (m.node, m.length) == ((i, len(tokens)) if i % 2 == 0 else (None, 0)), key
    assert ix.stats()["keys"] == (len(ADVERSARIAL_KEYS) + 1) // 2


def test_a_cache_node_belongs_to_one_key():
    ix = PrefixIndex(page_size=1)
    one_node(ix, 1, [1, 2], node=0)
    before = snapshot(ix)
    with pytest.raises(ValueError, match="path: expected cache nodes of key True, got node 0"):
        ix.insert(True, [1, 2, 3], [Segment(0, 0, 2, (0, 1)), Segment(1, 2, 3, (5,))])
    assert snapshot(ix) == before


# ---- inserts, duplicates, hidden pages ----------------------------------------------------------------


def test_duplicate_prefix_keeps_the_first_copy_and_holds_the_hidden_pages():
    ix = PrefixIndex(page_size=2)
    one_node(ix, "k", [1, 2, 3, 4], node=0)  # pages 0, 1
    # Prefilled separately: the same 4 tokens on node 1 (pages 10, 11), then node 2 continues at 4.
    ins = ix.insert("k", [1, 2, 3, 4, 5, 6], [Segment(1, 0, 4, (10, 11)), Segment(2, 4, 6, (12,))])
    assert ins.duplicate_tokens == 4 and ins.new_tokens == 2
    graft = ins.nodes[0]
    assert (graft.cache_node, graft.start, graft.pages, graft.hidden) == (2, 4, (12,), (10, 11))
    assert ix.match("k", [1, 2, 3, 4, 5, 6, 7]).node == 2
    assert ix.stats()["cached_pages"] == 5
    ev = ix.evict(1)  # the only leaf older than node 2's is node 0's, which has a child: node 2's goes
    assert ev.release == [2] and ev.pages == [10, 11, 12] and ev.tokens == 2
    # Node 1 was never indexed: the caller releases it with node 2 (its only reader), as the pages say.
    assert ix.evict(2).pages == [0, 1] and ix.stats()["nodes"] == 0


def test_a_split_graft_keeps_its_hidden_pages_in_the_upper_half():
    ix = PrefixIndex(page_size=2)
    one_node(ix, "k", [1, 2, 3, 4], node=0)  # pages 0, 1
    ix.insert("k", [1, 2, 3, 4, 5, 6], [Segment(1, 0, 4, (10, 11)), Segment(2, 4, 6, (12,))])
    # Node 3 forks from node 2 at 5, inside page 12 (a copy: page 13), and splits node 2's index node.
    ins = ix.insert("k", [1, 2, 3, 4, 5, 9],
                    [Segment(1, 0, 4, (10, 11)), Segment(2, 4, 5, (12,)), Segment(3, 5, 6, (13,))])
    assert [(n.cache_node, n.start, n.end, n.pages, n.hidden) for n in ix.nodes()] == [
        (0, 0, 4, (0, 1), ()), (2, 5, 6, (12,), ()), (2, 4, 5, (12,), (10, 11)), (3, 5, 6, (13,), ())]
    assert ins.duplicate_tokens == 4
    ev = ix.evict(1)  # node 2's tail (not touched by the insert) frees nothing, then node 3 frees page 13
    assert (ev.truncate, ev.release, ev.pages) == ([(2, 5)], [3], [13])
    ev = ix.evict(1)
    assert (ev.truncate, ev.release, ev.pages) == ([], [2], [10, 11, 12])


def test_full_duplicate_indexes_nothing():
    ix = PrefixIndex(page_size=4)
    one_node(ix, "k", [1, 2, 3], node=0)
    ins = one_node(ix, "k", [1, 2, 3], node=1, first_page=7)
    assert ins.nodes == [] and ins.new_tokens == 0 and ins.duplicate_tokens == 3
    assert ins.match.node == 0 and ix.stats()["cached_tokens"] == 3


def test_split_at_cache_node_boundaries_and_growth():
    ix = PrefixIndex(page_size=4)
    one_node(ix, "k", [1, 2, 3, 4, 5], node=0)  # pages 0, 1
    # Node 0 grew by two tokens in place (page 1), then node 1 forked at 7 continuing page 1 in place.
    ins = ix.insert("k", [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    [Segment(0, 0, 7, (0, 1)), Segment(1, 7, 9, (1, 2))])
    assert [(n.cache_node, n.start, n.end, n.pages) for n in ins.nodes] == [(0, 5, 7, (1,)), (1, 7, 9, (1, 2))]
    assert ins.duplicate_tokens == 0 and ix.stats()["cached_tokens"] == 9


# ---- page accounting with shared partial pages --------------------------------------------------------


def test_eviction_frees_only_pages_no_other_node_holds():
    """page_size 4. Prompt node 0: 6 tokens in pages 0 (full) and 1 (2 slots). Child 1 continues page 1 in
    place (slots 2..3) and takes page 2; child 2 copies page 1 into page 3 (copy on write) and takes page 4."""
    ix = PrefixIndex(page_size=4)
    prompt = [1, 2, 3, 4, 5, 6]
    one_node(ix, "k", prompt, node=0)
    a = ix.insert("k", prompt + [7, 7, 7], [Segment(0, 0, 6, (0, 1)), Segment(1, 6, 9, (1, 2))])
    ix.insert("k", prompt + [8, 8, 8, 8, 8], [Segment(0, 0, 6, (0, 1)), Segment(2, 6, 11, (3, 4))])
    assert ix.stats()["cached_pages"] == 5 and ix.stats()["evictable_pages"] == 5
    lock = ix.lock(a)
    assert ix.stats()["evictable_pages"] == 2  # pages 3 and 4: page 1 is shared with the locked path
    before = snapshot(ix)
    assert ix.evict(3) == Eviction([], [], [], 0, []) and snapshot(ix) == before  # all or nothing
    ev = ix.evict(1)
    assert (ev.release, ev.pages, ev.tokens) == ([2], [3, 4], 5)
    ix.unlock(lock)
    ev = ix.evict(1)  # the prompt has node 1's branch below it: that branch is the only leaf
    assert (ev.release, ev.pages) == ([1], [2])  # page 1 stays: the prompt holds it
    assert ix.evict(1).pages == [0, 1] and ix.stats()["cached_pages"] == 0


def test_lru_order_and_truncation():
    ix = PrefixIndex(page_size=2)
    one_node(ix, "k", [1, 1, 1, 1], node=0)  # pages 0, 1
    one_node(ix, "k", [2, 2, 2, 2], node=1, first_page=2)  # pages 2, 3
    ix.match("k", [1, 1, 1, 1, 0])  # node 0's tokens are now the more recent
    assert ix.evict(1).release == [1]
    # A match ending inside node 0 and an insert diverging there split it; the lower half is the leaf.
    ins = ix.insert("k", [1, 1, 1, 5], [Segment(0, 0, 3, (0, 1)), Segment(2, 3, 4, (4,))])
    assert ins.duplicate_tokens == 0
    ix.match("k", [1, 1, 1, 5, 0])  # the new branch is the most recent: node 0's tail goes first
    # Cutting node 0 back to 3 tokens frees no page (page 1 still holds its third token), so eviction goes
    # on to the next leaf in LRU order.
    ev = ix.evict(1)
    assert [(n.cache_node, n.start, n.end) for n in ev.evicted] == [(0, 3, 4), (2, 3, 4)]
    assert (ev.truncate, ev.release, ev.pages, ev.tokens) == ([(0, 3)], [2], [4], 2)
    assert ix.evict(2).release == [0]


def test_locks_survive_splits_and_clear_keeps_locked_paths():
    ix = PrefixIndex(page_size=3)
    ins = one_node(ix, "k", [1, 2, 3, 4, 5, 6, 7], node=0)
    lock = ix.lock(ix.match("k", [1, 2, 3, 4, 5, 6, 7, 8]))
    one_node(ix, "k", [1, 2, 9], node=1, first_page=10)  # splits the locked node at 2
    assert all(n.locks == 1 for n in ix.nodes() if n.cache_node == 0)
    ev = ix.clear()
    assert ev.release == [1] and ix.stats()["cached_tokens"] == 7 and ix.stats()["prompt_tokens"] == 0
    ix.unlock(lock)
    assert ix.clear().release == [0] and ix.stats() == PrefixIndex(3).stats()
    with pytest.raises(ValueError, match="match: expected a Match whose tokens are still cached"):
        ix.lock(ins)


def test_forget_takes_out_what_was_indexed_since_the_mark():
    """The undo of a failed request: new sequences (one splitting an earlier node, one below a new one) go
    again; what was cached before stays cached, and the counters of evictions do not move."""
    ix = PrefixIndex(page_size=2)
    one_node(ix, "k", [1, 2, 3, 4, 5], node=0)
    before = ix.stats()
    mark = ix.mark()
    one_node(ix, "k", [1, 2, 3, 9, 9], node=1, first_page=10)  # splits node 0's entry after 3 tokens
    ins = ix.insert("k", [1, 2, 3, 9, 9, 7, 7], [Segment(1, 0, 5, (10, 11, 12)), Segment(2, 5, 7, (12, 13))])
    one_node(ix, "j", [4, 4], node=3, first_page=20)
    lock = ix.lock(ins)
    with pytest.raises(ValueError, match="mark: expected the tokens indexed since to be unlocked, got 2 locked"):
        ix.forget(mark)
    ix.unlock(lock)
    ev = ix.forget(mark)
    assert sorted(ev.release) == [1, 2, 3] and ev.truncate == [] and ev.pages == [10, 11, 12, 13, 20]
    after = ix.stats()
    assert after == {**before, "nodes": 2}  # (node 0's entry stays split in two: the same tokens)
    assert (ix.match("k", [1, 2, 3, 4, 5, 6]).length, ix.match("k", [1, 2, 3, 9, 9, 7]).length) == (5, 3)
    with pytest.raises(ValueError, match="mark: expected"):
        ix.forget(ix.mark() + 1)


def test_page_accounting_agrees_with_tree_kv_cache():
    """The index's freed pages are the pages TreeKVCache frees when it releases the evicted nodes: a prompt of
    6 tokens (page_size 4), one branch continuing its partial page in place, one copying it."""
    cache = TreeKVCache(1, 1, 16, page_size=4, num_pages=16, dtype=torch.float32, device="cpu")
    ix = PrefixIndex(page_size=4)
    prompt = [11, 12, 13, 14, 15, 16]
    root = cache.add(len(prompt))
    kids = cache.fork(root, 2)
    for kid in kids:
        cache.append([kid], 3)
    assert cache.stats()["pages_copied"] == 1
    tokens = {root: prompt, kids[0]: prompt + [1, 2, 3], kids[1]: prompt + [4, 5, 6]}
    for node in (root, *kids):
        ix.insert("k", tokens[node], cache_path(cache.tree.node(node)))
    assert ix.stats()["cached_pages"] == cache.stats()["pages_used"] == 5
    for _ in range(3):
        free_before = set(cache.allocator.free_pages())
        ev = ix.evict(1)
        assert ev.truncate == []
        for node in ev.release:
            cache.release(node)
        assert sorted(set(cache.allocator.free_pages()) - free_before) == ev.pages
    assert cache.stats()["pages_used"] == 0 and ix.stats()["nodes"] == 0


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda ix: ix.match(1.0, [1, 2]), "key: expected None, str, bytes, int, bool or a tuple of them, got float"),
    (lambda ix: ix.match(("a", [1]), [1, 2]), "key: expected .*, got list"),
    (lambda ix: ix.match("k", [1.5, 2]), "tokens: expected a 1-D sequence of integer token ids, got float64"),
    (lambda ix: ix.match("k", [True, 2]), "tokens: expected integer token ids, got a bool"),
    (lambda ix: ix.match("k", [[1, 2]]), r"tokens: expected a 1-D .*shape \[1, 2\]"),
    (lambda ix: ix.match("k", [1, -2]), r"tokens: expected token ids in \[0, 2\*\*63\)"),
    (lambda ix: ix.match("k", "ab"), "tokens: expected a 1-D sequence of token ids, got str"),
    (lambda ix: ix.match("k", torch.tensor([1.0])),
     "tokens: expected integer token ids, got a tensor of torch.float32"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 0, 1, (0,))]), r"path: expected segments covering \[0, 2\)"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 1, 2, (0,))]), r"path\[0\].start: expected 0"),
    (lambda ix: ix.insert("k", [1, 2, 3], [Segment(0, 0, 3, (0,))]), r"path\[0\].pages: expected 2 page ids"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 0, 2, (-1,))]), r"path\[0\].pages: expected an int >= 0"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 0, 2, 5)]),
     r"path\[0\].pages: expected a sequence of page ids, got int"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 0, 1, (0,)), Segment(0, 1, 2, (0,))]),
     r"path\[1\].node: expected each cache node once on a path, got node 0 again"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0.0, 0, 2, (0,))]), r"path\[0\].node: expected an int, got float"),
    (lambda ix: ix.insert("k", [1, 2], [(0, 0, 2)]), r"path\[0\]: expected a \(node, start, end, pages\) segment"),
    (lambda ix: ix.insert("k", [1, 2], 5), "path: expected a sequence of"),
    (lambda ix: ix.evict(-1), "num_pages: expected an int >= 0, got -1"),
    (lambda ix: ix.lock((0, 1)), "match: expected a Match"),
    (lambda ix: ix.lock(PrefixIndex(2).insert("k", [1], [Segment(0, 0, 1, (0,))])),
     "match: expected a Match of this index"),
    (lambda ix: ix.unlock("lock"), "lock: expected a PrefixLock"),
])
def test_bad_input_names_the_argument_and_changes_nothing(call, message):
    ix = PrefixIndex(page_size=2)
    one_node(ix, "k", [1, 2, 3], node=7)
    before = snapshot(ix)
    with pytest.raises((ValueError, TypeError), match=message):
        call(ix)
    assert snapshot(ix) == before


def test_unlock_twice_is_an_error():
    ix = PrefixIndex(page_size=2)
    lock = ix.lock(one_node(ix, "k", [1, 2, 3], node=0))
    ix.unlock(lock)
    with pytest.raises(ValueError, match="lock: expected a held lock, got one already unlocked"):
        ix.unlock(lock)
    assert ix.stats()["locked_pages"] == 0


# ---- state machine against a brute-force model ---------------------------------------------------------


class FakeCache:
    """A paged cache reduced to bookkeeping, with TreeKVCache's node model: a node continues its parent's
    path at a fork position (possibly inside the parent), holding the pages of its own positions; a fork inside
    a page continues it in place when no one claimed the next slot, else copies it. A node lives while it is
    indexed, live, or has a living child; a page is free when no living node holds it."""

    def __init__(self, page_size: int, num_pages: int):
        self.s = page_size
        self.free = set(range(num_pages))
        self.nodes: dict[int, dict] = {}
        self.holders: dict[int, set[int]] = {}  # page -> nodes holding it
        self.next_id = 0

    def path_pages(self, nid: int, upto: int) -> list[int]:
        """Page ids of the node's path over positions [0, upto)."""
        n = self.nodes[nid]
        own = n["pages"][: -(-upto // self.s) - n["start"] // self.s]
        if n["parent"] is None:
            return list(own)
        return self.path_pages(n["parent"], n["start"])[: n["start"] // self.s] + list(own)

    def fill(self, page: int) -> int:
        """Slots of ``page`` claimed by some living node."""
        out = 0
        for h in self.holders[page]:
            n = self.nodes[h]
            first = n["start"] // self.s
            j = n["pages"].index(page) + first
            out = max(out, min(self.s, n["end"] - j * self.s))
        return out

    def plan(self, base, m: int, length: int):
        """Pages a new node forking from ``base`` at ``m`` (None, 0: a fresh root) holding [m, length) needs:
        (pages needed, whether the shared partial page continues in place)."""
        in_place = False
        need = -(-length // self.s) - m // self.s
        if m % self.s:
            page = self.path_pages(base, m)[-1]
            in_place = self.fill(page) == m % self.s
            need -= in_place
        return need, in_place

    def add(self, base, m: int, length: int, tokens, in_place: bool) -> int:
        nid, self.next_id = self.next_id, self.next_id + 1
        pages = []
        if m % self.s and in_place:
            pages.append(self.path_pages(base, m)[-1])
        while len(pages) < -(-length // self.s) - m // self.s:
            pages.append(min(self.free))
            self.free.remove(pages[-1])
        self.nodes[nid] = dict(parent=base, start=m, end=length, pages=pages, tokens=list(tokens[:length]),
                               indexed=False, live=False, kids=0)
        for p in pages:
            self.holders.setdefault(p, set()).add(nid)
        if base is not None:
            self.nodes[base]["kids"] += 1
        return nid

    def segments(self, nid: int) -> list[Segment]:
        n = self.nodes[nid]
        head = [] if n["parent"] is None else self.segments(n["parent"])
        if head:  # the parent's segment ends where this node forked from it
            last = head[-1]
            keep = -(-n["start"] // self.s) - last.start // self.s if n["start"] > last.start else 0
            head[-1] = Segment(last.node, last.start, n["start"], last.pages[:keep])
            head = [h for h in head if h.end > h.start]
        return head + [Segment(nid, n["start"], n["end"], tuple(n["pages"]))]

    def _drop(self, nid: int, pages, freed: list) -> None:
        for p in pages:
            self.holders[p].discard(nid)
            if not self.holders[p]:
                del self.holders[p]
                self.free.add(p)
                freed.append(p)

    def maybe_release(self, nid, freed: list) -> None:
        while nid is not None:
            n = self.nodes[nid]
            if n["indexed"] or n["live"] or n["kids"]:
                return
            self._drop(nid, n["pages"], freed)
            del self.nodes[nid]
            nid = n["parent"]
            if nid is not None:
                self.nodes[nid]["kids"] -= 1

    def truncate(self, nid: int, end: int, freed: list) -> None:
        n = self.nodes[nid]
        keep = -(-end // self.s) - n["start"] // self.s
        for other in self.nodes.values():
            assert other["parent"] != nid or other["start"] <= end, "truncated below a living fork"
        self._drop(nid, n["pages"][keep:], freed)
        n["pages"], n["end"], n["tokens"] = n["pages"][:keep], end, n["tokens"][:end]


KEYS = [None, "", b"", 0, False, "0", (0,), (False,)]


def model_key(key):
    """The model's own key identity: type and repr (independent of the index's canonical keys)."""
    return type(key).__name__, repr(key)


def lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PrefixIndexMachine(RuleBasedStateMachine):
    @initialize(page_size=st.integers(1, 4), num_pages=st.integers(4, 16))
    def setup(self, page_size, num_pages):
        self.index = PrefixIndex(page_size)
        self.cache = FakeCache(page_size, num_pages)
        self.num_pages = num_pages
        self.cached: dict[tuple, set[tuple]] = {}  # model key -> cached token sequences (prefixes stay cached)
        self.live: list[tuple] = []  # (key, tokens, lock, fake nodes)
        self.counts = dict(prompt_tokens=0, hit_tokens=0, evicted_tokens=0)
        self.model_key_of: dict = {}  # the index's canonical key -> the model's key, as sequences are inserted

    # ---- the model ----

    def model_match(self, key, tokens) -> int:
        best = max((lcp(t, tokens) for t in self.cached.get(model_key(key), ())), default=0)
        return min(best, max(len(tokens) - 1, 0))

    def snapshot(self) -> dict:
        """serial -> (stamp, locks, children, parent serial (None: a root), path tokens), before an eviction
        changes the nodes (a later split also changes an evicted node's ancestors)."""
        return {n.serial: (n.stamp, n.locks, len(n.children), None if n.parent.parent is None else n.parent.serial,
                           tuple(self.index.path_tokens(n).tolist())) for n in self.index.nodes()}

    def apply(self, ev: Eviction, before: dict) -> None:
        """Apply an eviction to the fake cache and the model; check it against LRU order and the pages freed."""
        # LRU: each victim is the least recently used unlocked leaf at its turn (ties: the older node).
        children = {serial: info[2] for serial, info in before.items()}
        candidates = {serial for serial, info in before.items() if not info[1] and not info[2]}
        for victim in ev.evicted:
            assert victim.serial == min(candidates, key=lambda serial: (before[serial][0], serial))
            candidates.remove(victim.serial)
            parent = before[victim.serial][3]
            if parent is not None:
                children[parent] -= 1
                if not children[parent] and not before[parent][1]:
                    candidates.add(parent)
        freed: list[int] = []
        for nid in ev.release:  # first: a released node may have forked from a truncated one
            self.cache.nodes[nid]["indexed"] = False
            self.cache.maybe_release(nid, freed)
        for nid, end in ev.truncate:
            self.cache.truncate(nid, end, freed)
        assert sorted(freed) == ev.pages
        for what, happened in (("evicted", ev.evicted), ("truncated", ev.truncate), ("hidden pages evicted",
                                any(n.hidden for n in ev.evicted))):
            if happened:
                event(what)
        # The model forgets the evicted tokens: each victim is a leaf, so no cached sequence runs past it.
        distinct_before = self.model_tokens()
        for victim in ev.evicted:
            path = before[victim.serial][4]
            seqs = self.cached[self.model_key_of[victim.key]]
            for t in list(seqs):
                if t[: victim.end] == path:
                    assert len(t) <= victim.end, "evicted a node some cached sequence runs past"
                    seqs.discard(t)
                    if victim.start:
                        seqs.add(t[: victim.start])
        assert distinct_before - self.model_tokens() == ev.tokens
        self.counts["evicted_tokens"] += ev.tokens

    def model_tokens(self) -> int:
        """Tokens the model holds, each once: the distinct non-empty prefixes of its sequences, per key."""
        return sum(len({t[:i] for t in seqs for i in range(1, len(t) + 1)}) for seqs in self.cached.values())

    def evict(self, num_pages: int) -> Eviction:
        before = self.snapshot()
        evictable = self.index.evictable_pages()
        ev = self.index.evict(num_pages)
        if num_pages > evictable:
            assert ev.evicted == [] and ev.pages == []
        else:
            assert len(ev.pages) >= num_pages
        self.apply(ev, before)
        return ev

    # ---- rules ----

    @rule(key=st.one_of(st.sampled_from(KEYS[:2]), st.sampled_from(KEYS)),
          tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9),
          extend=st.booleans(), use_match=st.booleans(), split=st.integers(0, 8), keep_live=st.booleans())
    def request(self, key, tokens, extend, use_match, split, keep_live):
        """A sequence arrives: match, fork from the hit (or prefill all of it), evict if short, insert."""
        mk = model_key(key)
        if extend and self.cached.get(mk):  # the next turn of a cached sequence
            tokens = list(sorted(self.cached[mk])[len(tokens) % len(self.cached[mk])]) + tokens
        self.counts["prompt_tokens"] += len(tokens)
        expected = self.model_match(key, tokens)
        m = self.index.match(key, tokens)
        assert m.length == expected
        self.counts["hit_tokens"] += m.length
        if m.length:
            # A hit reads only living pages holding exactly the matched tokens.
            assert m.node in self.cache.nodes
            assert self.cache.nodes[m.node]["tokens"][: m.length] == tokens[: m.length]
            assert m.length <= self.cache.nodes[m.node]["end"]
        hit = self.index.lock(m)
        base, at = (m.node, m.length) if use_match and m.length else (None, 0)
        need, in_place = self.cache.plan(base, at, len(tokens))
        if need > len(self.cache.free):
            self.evict(need - len(self.cache.free))
            need, in_place = self.cache.plan(base, at, len(tokens))
        if need > len(self.cache.free):  # out of pages: nothing changes
            event("out of pages")
            self.index.unlock(hit)
            return
        made = []
        cut = at + split
        if base is None and 0 < cut < len(tokens):  # prefilled as two nodes
            made.append(self.cache.add(None, 0, cut, tokens, False))
            base, at = made[-1], cut
            in_place = self.cache.plan(base, at, len(tokens))[1]
        made.append(self.cache.add(base, at, len(tokens), tokens, in_place))
        ins = self.index.insert(key, tokens, self.cache.segments(made[-1]))
        if m.length:
            event(f"hit {'inside' if m.length < self.cache.nodes[m.node]['end'] else 'at the end of'} a cache node")
        for what, happened in (("forked inside a page in place", in_place and at % self.index.page_size),
                               ("forked inside a page, copied", not in_place and at % self.index.page_size),
                               ("inserted hidden pages", any(n.hidden for n in ins.nodes)),
                               ("duplicate tokens", ins.duplicate_tokens)):
            if happened:
                event(what)
        for n in ins.nodes:
            self.cache.nodes[n.cache_node]["indexed"] = True
        self.cached.setdefault(mk, set()).add(tuple(tokens))
        assert self.model_key_of.setdefault(ins.match.entry.key, mk) == mk  # one index key per model key
        if keep_live:
            for nid in made:
                self.cache.nodes[nid]["live"] = True
            self.live.append((key, tokens, self.index.lock(ins), made))
        self.index.unlock(hit)
        for nid in made[::-1]:
            if nid in self.cache.nodes:
                self.cache.maybe_release(nid, [])

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        """A live sequence ends: its tokens stay cached, unlocked."""
        _, _, lock, made = self.live.pop(i % len(self.live))
        self.index.unlock(lock)
        for nid in made:
            self.cache.nodes[nid]["live"] = False
        for nid in made[::-1]:
            if nid in self.cache.nodes:
                self.cache.maybe_release(nid, [])

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def live_tokens_stay(self, i):
        key, tokens, _, _ = self.live[i % len(self.live)]
        self.counts["prompt_tokens"] += len(tokens) + 1
        m = self.index.match(key, tokens + [0])
        self.counts["hit_tokens"] += m.length
        assert m.length >= len(tokens)

    @rule(key=st.sampled_from(KEYS), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9),
          node=st.integers(0, 40))
    def bad_insert(self, key, tokens, node):
        """An insert that fails (a cache node of another key, or a page list one short) changes nothing."""
        before = snapshot(self.index)
        owner = next((n.key for n in self.index.nodes() if n.cache_node == node), None)
        if owner is not None and self.model_key_of[owner] != model_key(key):
            segs = [Segment(node, 0, len(tokens), tuple(range(-(-len(tokens) // self.index.page_size))))]
            message = "path: expected cache nodes of key"
            event("insert on another key's cache node refused")
        else:
            segs = [Segment(10**6, 0, len(tokens), tuple(range(-(-len(tokens) // self.index.page_size) - 1)))]
            message = r"path\[0\].pages: expected"
        with pytest.raises(ValueError, match=message):
            self.index.insert(key, tokens, segs)
        assert snapshot(self.index) == before

    @rule(num_pages=st.integers(0, 6))
    def evict_pages(self, num_pages):
        self.evict(num_pages)

    @rule()
    def clear(self):
        before = self.snapshot()
        self.apply(self.index.clear(), before)
        self.counts = dict.fromkeys(self.counts, 0)
        assert self.index.stats()["evictable_pages"] == 0

    # ---- invariants ----

    @invariant()
    def books_agree(self):
        nodes = self.index.nodes()
        stats = self.index.stats()
        for name, value in self.counts.items():
            assert stats[name] == value, name
        assert stats["cached_tokens"] == self.model_tokens() == sum(n.end - n.start for n in nodes)
        held = {p for n in nodes for p in n.held_pages()}
        locked = {p for n in nodes if n.locks for p in n.held_pages()}
        assert stats["cached_pages"] == len(held) and stats["locked_pages"] == len(locked)
        assert stats["evictable_pages"] == len(held - locked)
        # Whatever the index holds lives in the cache; the cache's pages are exactly the free list's complement.
        assert held <= set(self.cache.holders)
        assert set(self.cache.holders) | self.cache.free == set(range(self.num_pages))
        assert not set(self.cache.holders) & self.cache.free
        indexed = {n.cache_node for n in nodes}
        assert indexed == {nid for nid, n in self.cache.nodes.items() if n["indexed"]}
        # Each index node's pages are its cache node's pages over its positions.
        for n in nodes:
            assert list(n.pages) == self.cache.path_pages(n.cache_node, n.end)[n.start // self.index.page_size:]
            assert self.cache.nodes[n.cache_node]["tokens"][n.start: n.end] == n.tokens.tolist()
        # Locks: a node's count is the number of live sequences whose locked path runs through it.
        expected = {}
        for _, _, lock, _ in self.live:
            m = lock.entry
            while m is not None and m.parent is not None:
                expected[m.serial] = expected.get(m.serial, 0) + 1
                m = m.parent
        assert {n.serial: n.locks for n in nodes if n.locks} == expected


PrefixIndexMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
test_prefix_index_state_machine = PrefixIndexMachine.TestCase
