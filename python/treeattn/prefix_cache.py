"""A prefix cache over a :class:`treeattn.TreeKVCache`: finished sequences stay cached (their pages pinned),
a new prompt continues the longest cached prefix token by token, and cached sequences nobody uses are
evicted, least recently used first, when the pool runs dry.

:class:`PrefixKVCache` wires a :class:`treeattn.prefix_index.PrefixIndex` (which tokens live on which cache
nodes, under which isolation key; what to evict) to the cache (pages, nodes, copies):

- :meth:`PrefixKVCache.match` finds the longest cached prefix of a prompt (at most ``len(prompt) - 1``
  tokens), locks it against eviction and returns a new live leaf whose path holds exactly those tokens'
  KV: a child of the cache node holding the last matched token, or, when the match ends inside a node, a
  leaf beside it sharing its whole pages (the page the match ends in is copied: copy on write);
- :meth:`PrefixKVCache.insert` records a sequence (its whole path, prompt and continuation) and pins the
  cache nodes the index now reads, so they stay readable once released;
- :meth:`PrefixKVCache.reserve` runs a cache call that may need pages: on :class:`OutOfPages` it evicts
  unlocked cached leaves (LRU) and retries; it raises only when even evicting everything unlocked would not
  free enough pages, and then it evicts nothing (the cache is unchanged);
- an eviction unpins the cache nodes the index no longer reads (their pages return to the pool once no
  live path reads them) and cuts the others back.

What a hit guarantees: the returned leaf's path holds the KV computed for exactly the matched tokens under
the same key. A lock holds until :meth:`PrefixKVCache.unlock`: keep it while the leaf (or anything forked
from it) is in use. A live node that is indexed must stay locked (``insert(..., lock=True)``), since
evicting it would free nothing while it lives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple, TypeVar

from .cache import TreeKVCache
from .pages import OutOfPages
from .prefix_index import Eviction, Insertion, PrefixIndex, PrefixLock, as_tokens, cache_path

__all__ = ["PrefixKVCache", "PrefixHit"]

T = TypeVar("T")


class PrefixHit(NamedTuple):
    """``leaf``: a new live cache leaf holding the matched prefix (None when ``length == 0``: start a root);
    ``length``: tokens matched; ``lock``: keeps the matched tokens cached until unlocked."""

    leaf: int | None
    length: int
    lock: PrefixLock


class PrefixKVCache:
    """A :class:`PrefixIndex` kept in step with ``cache`` (see the module docstring)."""

    def __init__(self, cache: TreeKVCache):
        if not isinstance(cache, TreeKVCache):
            raise ValueError(f"cache: expected a treeattn.TreeKVCache, got {type(cache).__name__}")
        self.cache = cache
        self.index = PrefixIndex(cache.page_size)
        self._pinned: set[int] = set()  # cache nodes the index reads, each pinned once
        self.prefill_tokens = 0  # tokens computed for prompts (counted by callers through count_prefill)
        self.record_tokens = 0  # tokens computed only to cache a result (see recording)

    # ---- matching and recording ----

    def match(self, key, tokens) -> PrefixHit:
        """The longest cached prefix of ``tokens`` under ``key`` (at most ``len(tokens) - 1`` tokens), locked,
        and a live leaf holding it. May evict (unlocked) cached sequences to copy the page the match ends in;
        raises :class:`OutOfPages` with nothing changed but the index's counters when that does not fit."""
        m = self.index.match(key, tokens)
        lock = self.index.lock(m)
        if not m.length:
            return PrefixHit(None, 0, lock)
        try:
            leaf = self.reserve(lambda: self.cache.fork_at(m.node, m.length))
        except BaseException:
            self.index.unlock(lock)
            raise
        return PrefixHit(leaf, m.length, lock)

    def insert(self, key, tokens, node: int, *, lock: bool = False) -> tuple[Insertion, PrefixLock | None]:
        """Record that ``node``'s path holds the KV of ``tokens`` (all of it: ``len(tokens)`` is the path's
        length) under ``key``, and pin the cache nodes newly indexed. With ``lock`` the sequence is also locked
        (required while ``node`` is live); returns the :class:`Insertion` and that lock (or None)."""
        toks = as_tokens(tokens)
        n = self.cache._any_node(node, "insert")
        if len(toks) != n.end:
            raise ValueError(f"tokens: expected {n.end} tokens (node {n.id}'s path length), got {len(toks)}")
        ins = self.index.insert(key, toks, cache_path(n))
        for made in ins.nodes:
            if made.cache_node not in self._pinned:
                self.cache.pin(made.cache_node)
                self._pinned.add(made.cache_node)
        return ins, (self.index.lock(ins) if lock else None)

    def unlock(self, lock: PrefixLock) -> None:
        self.index.unlock(lock)

    # ---- eviction ----

    def reserve(self, call: Callable[[], T]) -> T:
        """``call()`` (a cache operation taking pages); on :class:`OutOfPages` evict least recently used
        unlocked cached sequences and retry. Raises :class:`OutOfPages` having evicted nothing when evicting
        every unlocked sequence would not free enough pages."""
        while True:
            try:
                return call()
            except OutOfPages as err:
                short = err.pages_needed - err.pages_free
                if short > self.freeable_pages():
                    raise
                if not self._apply(self.index.evict(short)).tokens:
                    raise

    def freeable_pages(self) -> int:
        """Pages evicting every unlocked cached sequence would give back to the pool: the index's evictable
        pages that no live cache node reads (a live node reading a cached, released ancestor keeps its pages;
        the index, which knows only cached sequences, counts them)."""
        read: set[int] = set()
        tree = self.cache.tree
        for node in tree.live_ids():
            for seg in cache_path(tree.any_node(node)):
                read.update(seg.pages)
        return len(self.index.evictable_page_ids() - read)

    def evict(self, num_pages: int) -> Eviction:
        """Evict unlocked cached leaves, LRU first, until ``num_pages`` index pages are free (or nothing, when
        fewer are evictable); returns what was evicted."""
        return self._apply(self.index.evict(num_pages))

    def _apply(self, ev: Eviction) -> Eviction:
        # Release first: a released node may have been forked beside one that is cut back.
        for c in ev.release:
            self._pinned.discard(c)
            self.cache.unpin(c)
        for c, end in ev.truncate:
            if self.cache.tree.any_node(c).released:  # (a live node keeps its tokens; its owner holds them)
                self.cache.cut_back(c, end)
        return ev

    def clear(self) -> Eviction:
        """Evict every unlocked cached sequence and reset the counters."""
        self.prefill_tokens = self.record_tokens = 0
        return self._apply(self.index.clear())

    # ---- accounting ----

    def count_prefill(self, num_tokens: int) -> None:
        """Count ``num_tokens`` prompt tokens computed (not served from the cache)."""
        self.prefill_tokens += int(num_tokens)

    def _counts(self) -> dict:
        return {**self.index._counters, "prefill_tokens": self.prefill_tokens, "record_tokens": self.record_tokens}

    def _restore_counts(self, counts: dict, names) -> None:
        for name in names:
            if name in self.index._counters:
                self.index._counters[name] = counts[name]
            else:
                setattr(self, name, counts[name])

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, matches and prefills cache a result rather than serve a prompt: the tokens
        computed count as ``record_tokens``, and ``prompt_tokens``/``hit_tokens``/``prefill_tokens`` stay as
        they were (evictions still count)."""
        before = self._counts()
        try:
            yield
        finally:
            self.record_tokens += self.prefill_tokens - before["prefill_tokens"]
            self._restore_counts(before, ("prompt_tokens", "hit_tokens", "prefill_tokens"))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Within the block, an exception undoes what the block did to the index: the tokens it indexed are
        taken out again (their cache nodes unpinned: release the block's live nodes and locks before it
        ends), and every counter is as before but ``evicted_tokens`` (sequences evicted to make room stay
        evicted: their pages were reused)."""
        before, mark = self._counts(), self.index.mark()
        try:
            yield
        except BaseException:
            self._apply(self.index.forget(mark))
            self._restore_counts(before, [name for name in before if name != "evicted_tokens"])
            raise

    def stats(self) -> dict:
        """The index's counters (``prompt_tokens``, ``hit_tokens``, ``cached_tokens``, ``evicted_tokens``,
        ``cached_pages``, ``evictable_pages``, ``locked_pages``, ``nodes``, ``keys``), ``prefill_tokens``,
        ``record_tokens``, and the pool's ``pages_used``, ``pages_free``, ``num_pages``."""
        pool = self.cache.stats()
        return {**self.index.stats(), "prefill_tokens": self.prefill_tokens, "record_tokens": self.record_tokens,
                "pages_used": pool["pages_used"], "pages_free": pool["pages_free"], "num_pages": pool["num_pages"]}
