"""Draft continuations from a prefix cache's token index: what followed a sequence's whole history in the
sequences cached under its key (an earlier answer to the same prompt, the previous turn of a conversation,
the other samples of a self-consistency run)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._validate import check_int
from ..prefix_index import PrefixIndex, _common_prefix, canonical_key
from .ngram import Continuation


class CachedContinuations:
    """A :class:`~treeattn.speculative.TokenSource` over ``index`` (a :class:`~treeattn.prefix_index.PrefixIndex`)
    for one sequence whose tokens so far are ``history``, under isolation key ``key``.

    A radix index answers prefixes, not suffixes: the continuations are those of the cached sequences that
    begin with the whole ``history`` (whatever suffix is asked for, which ``history`` ends with), each with
    ``match_length = len(history)`` (a whole-context match outweighs any n-gram's), most recently used
    first. Read-only: it neither counts lookups nor marks anything used.
    """

    def __init__(self, index: PrefixIndex, key, history: Sequence[int]):
        if not isinstance(index, PrefixIndex):
            raise ValueError(f"index: expected a treeattn.prefix_index.PrefixIndex, got {type(index).__name__}")
        canonical_key(key, "key")  # (checked here; the index canonicalizes it on each lookup)
        self.index, self.key, self.history = index, key, list(history)

    def continuations(self, suffix: Sequence[int], max_tokens: int, max_matches: int) -> list[Continuation]:
        max_tokens = check_int("max_tokens", max_tokens, 0)
        max_matches = check_int("max_matches", max_matches, 0)
        found = self._locate()
        if found is None or max_tokens == 0 or max_matches == 0:
            return []
        node, offset = found
        out: list[Continuation] = []
        # Depth first, the most recently used branch first, each branch followed to max_tokens or a leaf.
        stack = [(node, offset, ())]
        while stack and len(out) < max_matches:
            n, at, tokens = stack.pop()
            tokens = tokens + tuple(int(t) for t in n.tokens[at:at + max_tokens - len(tokens)])
            kids = [kid for kid in n.children.values() if not kid.evicted]
            if len(tokens) >= max_tokens or not kids:
                if tokens:
                    out.append(Continuation(len(self.history), n.stamp, tokens))
                continue
            stack.extend((kid, 0, tokens) for kid in sorted(kids, key=lambda k: (k.stamp, k.serial)))
        return out

    def _locate(self):
        """``(index node, offset)``: where the whole history ends (after ``offset`` of the node's tokens), or
        None when no cached sequence begins with it."""
        node = self.index.root(self.key)
        history = np.asarray(self.history, dtype=np.int64)
        pos = 0
        if node is None or not len(history):
            return None
        while pos < len(history):
            child = node.children.get(int(history[pos]))
            if child is None or child.evicted:
                return None
            n = _common_prefix(child.tokens, history[pos:])
            pos += n
            if n < len(child.tokens):
                return (child, n) if pos == len(history) else None
            node = child
        return node, len(node.tokens)
