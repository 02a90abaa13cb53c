"""Draft trees without a draft model: continuations of the sequence's recent suffix wherever it occurred
before (in its own prompt and generated text, and in any other token source), merged into a token tree.

The index is incremental: appending ``k`` tokens costs ``O(k * max_ngram)`` dictionary updates, and a lookup
reads at most ``max_matches`` occurrences per n-gram size, whatever the history's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from .._validate import check_int
from .tree import ROOT, DraftTree


class Continuation(NamedTuple):
    """What followed one earlier occurrence of the suffix: ``match_length`` tokens matched, then ``tokens``;
    ``recency`` orders occurrences within a source (larger: more recent)."""

    match_length: int
    recency: int
    tokens: tuple[int, ...]


@runtime_checkable
class TokenSource(Protocol):
    """Anything that can say how a token suffix went on elsewhere (a sequence's own history, a prefix cache's
    token index, a corpus)."""

    def continuations(self, suffix: Sequence[int], max_tokens: int, max_matches: int) -> list[Continuation]:
        """Up to ``max_matches`` continuations (each at most ``max_tokens`` tokens) of occurrences whose
        preceding tokens equal a suffix of ``suffix`` (longer matches first, then more recent)."""
        ...


class NgramIndex:
    """One token stream and a map from each of its n-grams (``min_ngram <= n <= max_ngram``) to the positions
    right after their occurrences, extended as tokens arrive.

    ``tokens``: the initial stream (e.g. the prompt). ``extend(tokens)`` appends accepted tokens.
    """

    def __init__(self, tokens: Sequence[int] = (), *, min_ngram: int = 1, max_ngram: int = 4):
        self.min_ngram = check_int("min_ngram", min_ngram, 1)
        self.max_ngram = check_int("max_ngram", max_ngram, self.min_ngram)
        self._tokens: list[int] = []
        self._positions: dict[tuple[int, ...], list[int]] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def copy(self) -> NgramIndex:
        """An independent index of the same stream (e.g. for each of ``num_return_sequences`` samples that
        share a prompt); ``O(len(self) * max_ngram)``, once per fork."""
        twin = NgramIndex(min_ngram=self.min_ngram, max_ngram=self.max_ngram)
        twin._tokens = list(self._tokens)
        twin._positions = {gram: list(positions) for gram, positions in self._positions.items()}
        return twin

    def suffix(self, length: int) -> list[int]:
        """The last ``length`` tokens (fewer when the stream is shorter)."""
        length = check_int("length", length, 0)
        return self._tokens[max(0, len(self._tokens) - length):]

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` (ints >= 0; checked before anything changes)."""
        if hasattr(tokens, "tolist"):
            tokens = tokens.tolist()
        new = [check_int(f"tokens[{i}]", t, 0) for i, t in enumerate(tokens)]
        stream = self._tokens
        for token in new:
            stream.append(token)
            end = len(stream)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._positions.setdefault(tuple(stream[end - n:end]), []).append(end)

    def continuations(self, suffix: Sequence[int], max_tokens: int, max_matches: int) -> list[Continuation]:
        max_tokens = check_int("max_tokens", max_tokens, 0)
        max_matches = check_int("max_matches", max_matches, 0)
        suffix = list(suffix)
        stream = self._tokens
        seen: set[int] = set()
        out: list[Continuation] = []
        for n in range(min(self.max_ngram, len(suffix)), self.min_ngram - 1, -1):
            if len(out) >= max_matches:
                break
            positions = self._positions.get(tuple(suffix[len(suffix) - n:]), ())
            # Positions are appended in order, so the tail holds the most recent occurrences; a position at
            # the stream's end has no continuation yet.
            for start in reversed(positions[-(max_matches + 1):]):
                if len(out) >= max_matches:
                    break
                if start >= len(stream) or start in seen:
                    continue
                seen.add(start)
                out.append(Continuation(n, start, tuple(stream[start:start + max_tokens])))
        return out


def draft_ngram_tree(index: NgramIndex, num_speculative_tokens: int, *, sources: Sequence[TokenSource] = (),
                     max_matches: int = 16) -> DraftTree:
    """A draft tree of at most ``num_speculative_tokens`` nodes continuing ``index``'s stream.

    Continuations of the stream's last ``index.max_ngram`` tokens come from its own earlier occurrences and
    then from each of ``sources`` (``max_matches`` per source). They are merged into a trie; each trie node
    scores the summed match lengths of the continuations through it (frequency, longer matches weighing
    more), ties going to the source listed first and then to the most recent occurrence. The best-scored
    nodes are kept (a node never outscores its parent, so they form a tree); siblings are ordered by score,
    best first. Proposals are deterministic (``draft_probs`` None). Deterministic: the same inputs give the
    same tree.
    """
    budget = check_int("num_speculative_tokens", num_speculative_tokens, 0)
    max_matches = check_int("max_matches", max_matches, 1)
    for i, source in enumerate(sources):
        if not isinstance(source, TokenSource):
            raise ValueError(f"sources[{i}]: expected a TokenSource (with .continuations), got {type(source).__name__}")
    if budget == 0 or len(index) == 0:
        return DraftTree.empty()
    suffix = index.suffix(index.max_ngram)
    # Trie over continuations: prefix -> [score, rank]; rank is the first (best) continuation through it.
    trie: dict[tuple[int, ...], list[int]] = {}
    rank = 0
    for source in (index, *sources):
        found = source.continuations(suffix, budget, max_matches)
        for cont in sorted(found, key=lambda c: (-c.match_length, -c.recency)):
            for depth in range(1, len(cont.tokens) + 1):
                entry = trie.setdefault(cont.tokens[:depth], [0, rank])
                entry[0] += cont.match_length
            rank += 1
    if not trie:
        return DraftTree.empty()
    # Best first: higher score, then earlier rank, then shallower (a parent ties its best child, and must come
    # first), then the tokens themselves so the order is total.
    order = sorted(trie, key=lambda prefix: (-trie[prefix][0], trie[prefix][1], len(prefix), prefix))[:budget]
    # Topological order with siblings best-first: walk the kept trie depth by depth.
    by_parent: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for prefix in order:
        by_parent.setdefault(prefix[:-1], []).append(prefix)
    tokens: list[int] = []
    parents: list[int] = []
    frontier: list[tuple[tuple[int, ...], int]] = [((), ROOT)]
    while frontier:
        next_frontier = []
        for prefix, node in frontier:
            for child in by_parent.get(prefix, ()):
                tokens.append(child[-1])
                parents.append(node)
                next_frontier.append((child, len(tokens) - 1))
        frontier = next_frontier
    return DraftTree(tokens, parents)
