"""CachedContinuations: what followed a whole history in the sequences a prefix cache holds under one key —
inside an edge and across branches (most recently used first), bounded by max_tokens and max_matches, never
another key's, nothing when the history is not a cached prefix; read-only; errors."""

import pytest
import torch

import treeattn
from treeattn.prefix_cache import PrefixKVCache
from treeattn.speculative import CachedContinuations, NgramIndex, TokenSource, draft_ngram_tree


def _cached(sequences):
    """A prefix cache holding ``sequences``, ``(key, tokens)`` each, inserted in order."""
    prefixes = PrefixKVCache(treeattn.TreeKVCache(1, 1, 16, page_size=4, num_pages=64, dtype=torch.float32,
                                                  device="cpu"))
    for key, tokens in sequences:
        node = prefixes.cache.add(len(tokens))
        prefixes.insert(key, tokens, node)
        prefixes.cache.release(node)  # (the index pins what it reads)
    return prefixes.index


def test_continuations_of_the_whole_history():
    index = _cached([("a", [1, 2, 3, 4, 5, 6, 7]), ("a", [1, 2, 3, 9, 8]), ("b", [1, 2, 3, 11, 12])])
    source = CachedContinuations(index, "a", [1, 2, 3])
    assert isinstance(source, TokenSource)
    before = index.stats()
    found = source.continuations([3], max_tokens=3, max_matches=8)
    assert sorted(c.tokens for c in found) == [(4, 5, 6), (9, 8)]
    assert all(c.match_length == 3 for c in found)
    assert index.stats() == before  # read-only: no lookups counted
    # Inside an edge: the rest of it, then on.
    assert [c.tokens for c in CachedContinuations(index, "a", [1, 2, 3, 4, 5]).continuations([5], 9, 4)] == [(6, 7)]
    assert len(source.continuations([3], 3, 1)) == 1
    assert source.continuations([3], 0, 4) == [] and source.continuations([3], 3, 0) == []
    # Isolation, histories that are no cached prefix, a finished sequence.
    assert [c.tokens for c in CachedContinuations(index, "b", [1, 2, 3]).continuations([3], 4, 4)] == [(11, 12)]
    assert CachedContinuations(index, "c", [1, 2, 3]).continuations([3], 4, 4) == []
    assert CachedContinuations(index, "a", [1, 2, 4]).continuations([4], 4, 4) == []
    assert CachedContinuations(index, "a", [2, 3]).continuations([3], 4, 4) == []
    assert CachedContinuations(index, "a", [1, 2, 3, 9, 8]).continuations([8], 4, 4) == []
    assert CachedContinuations(index, "a", []).continuations([], 4, 4) == []


def test_drafts_the_cached_answer():
    """An n-gram tree over a history with no repeats of its own drafts what followed it in the cache."""
    index = _cached([("k", [5, 6, 7, 8, 9, 10, 11])])
    history = [5, 6, 7]
    tree = draft_ngram_tree(NgramIndex(history), 3, sources=[CachedContinuations(index, "k", history)])
    assert tree.tokens.tolist() == [8, 9, 10] and tree.parents.tolist() == [-1, 0, 1]


def test_errors():
    index = _cached([])
    with pytest.raises(ValueError, match="index: expected a treeattn.prefix_index.PrefixIndex, got dict"):
        CachedContinuations({}, None, [1])
    with pytest.raises(ValueError, match="key"):
        CachedContinuations(index, 1.5, [1])
    with pytest.raises(ValueError, match="max_tokens: expected an int >= 0"):
        CachedContinuations(index, None, [1]).continuations([1], -1, 2)
