"""treeattn.prefix_index.PrefixIndex: unit cases (token-granular matches, isolation keys, page accounting of
shared partial pages, errors that change nothing) and a hypothesis state machine against a brute-force model
(a set of cached token sequences per key) driving a small fake paged cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from treeattn.prefix_index import Eviction, Match, PrefixIndex, Segment


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
    assert ix.match("k", [5, 6, 7, 1]) == Match(3, 3, ix.match("k", [5, 6, 7, 1]).entry)  # mid-page, mid-node
    assert ix.match("k", [5, 6, 7, 8, 9, 10]).length == 5  # a full hit still computes the last token
    assert ix.match("k", [5, 6, 7, 8, 9, 10, 11]).length == 6
    assert ix.match("k", [5]).length == 0 and ix.match("k", []).length == 0
    assert ix.match("k", [4, 6]) == Match(None, 0, None)
    stats = ix.stats()
    assert stats["prompt_tokens"] == 4 + 6 + 7 + 1 + 0 + 2 + 4 and stats["hit_tokens"] == 3 + 5 + 6 + 3


def test_match_walks_a_split_tree_and_inputs_of_every_kind():
    ix = PrefixIndex(page_size=2)
    one_node(ix, None, [1, 2, 3, 4], node=0)
    one_node(ix, None, [1, 2, 9, 9, 9], node=1, first_page=10)
    one_node(ix, None, [1, 2, 3, 4, 5, 6], node=2, first_page=20)
    assert ix.match(None, [1, 2, 9, 9, 9, 0]) .node == 1
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


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda ix: ix.match(1.0, [1, 2]), "key: expected None, str, bytes, int, bool or a tuple of them, got float"),
    (lambda ix: ix.match(("a", [1]), [1, 2]), "key: expected .*, got list"),
    (lambda ix: ix.match("k", [1.5, 2]), "tokens: expected a 1-D sequence of integer token ids, got float64"),
    (lambda ix: ix.match("k", [True, 2]), "tokens: expected integer token ids, got a bool"),
    (lambda ix: ix.match("k", [[1, 2]]), r"tokens: expected a 1-D .*shape \[1, 2\]"),
    (lambda ix: ix.match("k", [1, -2]), r"tokens: expected token ids in \[0, 2\*\*63\)"),
    (lambda ix: ix.match("k", "ab"), "tokens: expected a 1-D sequence of token ids, got str"),
    (lambda ix: ix.match("k", torch.tensor([1.0])), "tokens: expected integer token ids, got a tensor of torch.float32"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 0, 1, (0,))]), r"path: expected segments covering \[0, 2\)"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 1, 2, (0,))]), r"path\[0\].start: expected 0"),
    (lambda ix: ix.insert("k", [1, 2, 3], [Segment(0, 0, 3, (0,))]), r"path\[0\].pages: expected 2 page ids"),
    (lambda ix: ix.insert("k", [1, 2], [Segment(0, 0, 2, (-1,))]), r"path\[0\].pages: expected an int >= 0"),
    (lambda ix: ix.insert("k", [1, 2], [(0, 0, 2)]), r"path\[0\]: expected a \(node, start, end, pages\) segment"),
    (lambda ix: ix.insert("k", [1, 2], 5), "path: expected a sequence of"),
    (lambda ix: ix.evict(-1), "num_pages: expected an int >= 0, got -1"),
    (lambda ix: ix.lock((0, 1)), "match: expected a Match"),
    (lambda ix: ix.lock(PrefixIndex(2).insert("k", [1], [Segment(0, 0, 1, (0,))])), "match: expected a Match of this index"),
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
