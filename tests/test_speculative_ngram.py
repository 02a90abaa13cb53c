"""The n-gram index and drafter: incremental index equal to a brute-force scan, drafted trees continue the
history, ranking, token sources, validation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeattn.speculative import (
    ROOT,
    Continuation,
    DraftTree,
    NgramIndex,
    draft_ngram_tree,
)


def brute_continuations(stream, suffix, min_n, max_n, max_tokens, max_matches):
    """Scan the whole stream: longest n first, then most recent occurrence first."""
    out, seen = [], set()
    for n in range(min(max_n, len(suffix)), min_n - 1, -1):
        for start in range(len(stream) - 1, n - 1, -1):
            if len(out) >= max_matches:
                return out
            if start in seen or stream[start - n:start] != list(suffix[len(suffix) - n:]):
                continue
            seen.add(start)
            out.append(Continuation(n, start, tuple(stream[start:start + max_tokens])))
    return out


streams = st.lists(st.integers(0, 3), min_size=0, max_size=40)


@settings(max_examples=80, deadline=None)
@given(streams, st.lists(st.integers(1, 6), max_size=8), st.integers(1, 3), st.integers(0, 2),
       st.integers(0, 6), st.integers(1, 5))
def test_incremental_index_equals_brute_force(stream, chunks, min_n, extra_n, max_tokens, max_matches):
    max_n = min_n + extra_n
    index = NgramIndex(stream[:3], min_ngram=min_n, max_ngram=max_n)
    at = 3
    for size in chunks + [len(stream)]:
        index.extend(stream[at:at + size])
        at += size
    assert index.tokens == stream and len(index) == len(stream)
    suffix = index.suffix(max_n)
    assert suffix == stream[-max_n:] if stream else suffix == []
    got = index.continuations(suffix, max_tokens, max_matches)
    assert got == brute_continuations(stream, suffix, min_n, max_n, max_tokens, max_matches)
    whole = NgramIndex(stream, min_ngram=min_n, max_ngram=max_n)
    assert draft_ngram_tree(whole, 5).tokens.tolist() == draft_ngram_tree(index, 5).tokens.tolist()


@settings(max_examples=80, deadline=None)
@given(streams, st.integers(0, 9), st.integers(1, 4))
def test_drafted_paths_continue_the_history(stream, budget, max_n):
    index = NgramIndex(stream, max_ngram=max_n)
    tree = draft_ngram_tree(index, budget, max_matches=4)
    assert tree.num_nodes <= budget and tree.draft_probs is None
    suffix = stream[-max_n:]
    for node in range(tree.num_nodes):
        path = tree.path_tokens(node)
        # Some earlier occurrence of a suffix of the stream's end goes on with exactly this path.
        assert any(stream[start:start + len(path)] == path
                   and any(stream[start - n:start] == suffix[len(suffix) - n:] for n in range(1, max_n + 1)
                           if n <= start and n <= len(suffix))
                   for start in range(1, len(stream))), (node, path)
    if budget and any(stream[-1] == t for t in stream[:-1]):
        assert tree.num_nodes > 0  # a repeated last token always has a continuation


def test_branches_ranked_by_frequency_then_recency():
    # "1 2" went on with 3 twice and with 4 once (most recently): 3 first, then the equally frequent
    # "4 7", "3 6" and "3 5" by recency.
    index = NgramIndex([1, 2, 3, 5, 1, 2, 3, 6, 1, 2, 4, 7, 1, 2], max_ngram=2)
    tree = draft_ngram_tree(index, 3)
    assert [tree.path_tokens(i) for i in range(3)] == [[3], [4], [4, 7]]
    assert tree.parents.tolist() == [ROOT, ROOT, 1]
    # Equal evidence: the most recent continuation is drafted to its end before the older ones.
    wider = draft_ngram_tree(index, 6)
    assert sorted(wider.path_tokens(i) for i in range(6)) == [[3], [3, 6], [4], [4, 7], [4, 7, 1], [4, 7, 1, 2]]
    again = draft_ngram_tree(NgramIndex(index.tokens, max_ngram=2), 3)
    assert again.tokens.tolist() == tree.tokens.tolist() and again.parents.tolist() == tree.parents.tolist()
    # A longer match outweighs a more recent shorter one: "0 1 2" went on with 8, later "5 1 2" with 3.
    longer = NgramIndex([0, 1, 2, 8, 5, 1, 2, 3, 0, 1, 2], max_ngram=3)
    assert draft_ngram_tree(longer, 1).tokens.tolist() == [8]


def test_token_sources_add_branches():
    class Corpus:
        def __init__(self, documents):
            self.indices = [NgramIndex(doc, max_ngram=3) for doc in documents]

        def continuations(self, suffix, max_tokens, max_matches):
            found = []
            for index in self.indices:
                found += index.continuations(suffix, max_tokens, max_matches - len(found))
            return found

    own = NgramIndex([7, 8, 9, 1, 2], max_ngram=3)
    assert draft_ngram_tree(own, 4).num_nodes == 0
    corpus = Corpus([[5, 1, 2, 3, 4], [1, 2, 6]])
    tree = draft_ngram_tree(own, 4, sources=[corpus])
    assert {tuple(tree.path_tokens(leaf)) for leaf in tree.leaves()} == {(3, 4), (6,)}
    assert tree.num_nodes == 3
    own.extend([3, 0, 1, 2])  # own history now says "1 2 3 0": it comes before the corpus at equal score
    tree = draft_ngram_tree(own, 2, sources=[corpus])
    assert tree.path_tokens(1) == [3, 0]


def test_copies_are_independent():
    prompt = NgramIndex([1, 2, 3, 1, 2], max_ngram=2)
    a, b = prompt.copy(), prompt.copy()
    a.extend([4, 1, 2])
    b.extend([3])
    assert prompt.tokens == [1, 2, 3, 1, 2] and b.tokens == [1, 2, 3, 1, 2, 3]
    assert draft_ngram_tree(a, 1).tokens.tolist() == [4]  # a's own continuation, the most recent
    assert draft_ngram_tree(prompt, 1).tokens.tolist() == [3]
    assert a.continuations([1, 2], 2, 8) == NgramIndex(a.tokens, max_ngram=2).continuations([1, 2], 2, 8)


def test_sequence_without_repeats_drafts_nothing():
    assert draft_ngram_tree(NgramIndex([1, 2, 3, 4]), 8).num_nodes == 0
    assert draft_ngram_tree(NgramIndex([]), 8).num_nodes == 0
    assert draft_ngram_tree(NgramIndex([1, 1]), 0).num_nodes == 0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"max_ngram: expected an int >= 3, got 2"):
        NgramIndex(min_ngram=3, max_ngram=2)
    index = NgramIndex([1, 2, 1])
    with pytest.raises(ValueError, match=r"tokens\[1\]: expected an int >= 0, got -4"):
        index.extend([5, -4])
    assert index.tokens == [1, 2, 1]  # a failing call changes nothing
    with pytest.raises(TypeError, match=r"tokens\[0\]: expected an int"):
        index.extend([1.0])
    with pytest.raises(ValueError, match=r"num_speculative_tokens: expected an int >= 0, got -1"):
        draft_ngram_tree(index, -1)
    with pytest.raises(ValueError, match=r"sources\[0\]: expected a TokenSource"):
        draft_ngram_tree(index, 4, sources=[object()])
    with pytest.raises(ValueError, match=r"max_matches: expected an int >= 1, got 0"):
        draft_ngram_tree(index, 4, max_matches=0)
    assert isinstance(draft_ngram_tree(index, 4), DraftTree)
