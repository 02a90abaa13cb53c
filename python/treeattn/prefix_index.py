"""A token radix index over the nodes of a paged KV cache: which cached sequences hold which tokens, the
longest cached prefix of a prompt (token by token), and which cached leaves to evict when pages run out.

Pure host bookkeeping. The index never touches the cache: it records what the caller tells it (a sequence's
tokens live on such cache nodes and pages) and answers with cache nodes, token counts and page ids.

**The cache it describes.** A cache node (an int id) holds a run of consecutive tokens continuing its
parent's path, path positions ``[start, end)``, in pages ``start // page_size .. ceil(end / page_size) - 1``
(``treeattn.TreeKVCache``'s node model). A sequence's KV is the root→leaf path of such nodes, given to
:meth:`PrefixIndex.insert` as :class:`Segment` s. Two paths may share a physical page: a branch that
continued its parent's partly filled tail page in place holds that page too, and a page is free only when
nothing holds it.

**Index nodes.** Each key has a radix tree whose edges are runs of tokens (an int64 numpy array per edge;
children are found by their first token, then a whole run is compared at once). Every index node maps its
tokens to one cache node and the positions ``[start, end)`` there, and holds the physical pages of those
positions (the partly shared first and last page included). Inserting a path splits edges at the tokens
where sequences diverge and at the cache node boundaries of the path; a split keeps the original object as
the lower half, so a :class:`PrefixLock` taken before still holds it (and the new upper half).

**Semantics of a match.** ``match(key, tokens)`` walks the key's tree comparing actual tokens (never
hashes), through whole edges and into the middle of one, and returns the cache node holding the last
matched token and the matched length ``m``, at most ``len(tokens) - 1`` (the last prompt token is always
computed: its logits are needed). What a hit guarantees: the root→``node`` path of the cache holds the KV
of exactly ``tokens[:m]`` at positions ``[0, m)``, computed under the same key; the caller continues it by
forking at position ``m`` (inside ``node`` when ``m < end``: the shared partial page is copied on write or
continued in place, as the cache decides). The guarantee holds until the matched index nodes are evicted:
take a :meth:`~PrefixIndex.lock` before releasing control.

**Duplicates.** Two sequences prefilled separately may hold the same tokens on different cache nodes. The
first one indexed keeps those tokens; a later path is indexed only where its tokens are new, and its first
new index node hangs below the existing ones (any cache node whose path holds the same tokens is as good a
fork point). Its pages over the earlier, duplicate positions are not on the index path, so that node holds
them too ("hidden" pages): they are freed when it is evicted, as the cache frees them when it releases the
node. Tokens already indexed on another node are counted in ``Insertion.duplicate_tokens``; a path nothing
new of which was indexed (``Insertion.nodes`` empty) is the caller's to release.

**Isolation.** Keys separate tenants, adapters and model revisions: each key has its own tree and a match
never crosses keys. Keys are None, str, bytes, int, bool or tuples of them, compared with their types
(``1``, ``True`` and ``"1"`` are three keys, as are ``None`` and ``""``); floats are refused (NaN never
equals itself, and ``1.0 == 1``).

**Locking and eviction.** A live sequence locks the index node it forked from (or the one its own tokens end
in), which locks every ancestor up to the root; locks count. Only unlocked leaves are evicted, least
recently used first: a logical clock ticks once per ``match``/``insert`` and stamps every index node the call
walked (the one a match ends inside included); ties go to the node made first, so eviction is deterministic.
``evict(num_pages)`` evicts leaves in that order (a parent left without children joins the candidates) until
at least ``num_pages`` pages are free, or evicts nothing when even every unlocked node would not free that
many (the caller then reports the pool exhausted with nothing changed). A page counts as freed when no index
node holds it any more; pages shared with a locked node or another cached node stay. The caller applies the
:class:`Eviction`: release the cache nodes the index no longer reads at all, and cut the others back to the
given end (their pages past it are the freed ones).

**The caller's contract.** ``insert`` trusts that the path holds those tokens' KV under that key (it checks
the shape of the path, and that no cache node is indexed under two keys). Lock right after ``match``: a match
ends inside an index node and its lock holds that whole node; if the node is split and its lower half evicted
before the lock is taken, ``lock`` refuses the stale match (match again). Apply an :class:`Eviction` by
releasing first and cutting back second (a released node may have forked inside one that is cut back), and
keep every cache node of a path alive while a descendant is (the cache's tree does).

**Statistics.** ``prompt_tokens`` (tokens given to ``match``), ``hit_tokens`` (tokens matched),
``cached_tokens`` (tokens the index holds, each once), ``evicted_tokens``, ``cached_pages`` (pages some
index node holds), ``evictable_pages`` (of those, the pages no locked node holds: what evicting every
unlocked node would free), ``locked_pages``, ``nodes`` and ``keys``.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np
import torch

from ._validate import check_int

__all__ = ["PrefixIndex", "Segment", "cache_path", "Match", "Insertion", "Eviction", "PrefixLock", "IndexNode"]


class Segment(NamedTuple):
    """Part of a cache path: cache node ``node`` holds path positions ``[start, end)`` in ``pages`` (the ids
    of page indices ``start // page_size .. ceil(end / page_size) - 1``; empty when ``start == end``)."""

    node: int
    start: int
    end: int
    pages: tuple


def cache_path(node) -> list[Segment]:
    """The :class:`Segment` s of a cache node's root→node path, from nodes with ``treeattn.tree.Node``'s
    fields (``id``, ``parent``, ``start``, ``end``, ``pages``); nodes holding no tokens are left out."""
    chain = []
    while node is not None:
        if node.end > node.start:
            chain.append(Segment(node.id, node.start, node.end, tuple(node.pages)))
        node = node.parent
    return chain[::-1]


class Match(NamedTuple):
    """``node``: the cache node holding the last matched token (None when ``length == 0``); ``length``: the
    tokens matched; ``entry``: the index node the match ended in (what :meth:`PrefixIndex.lock` locks)."""

    node: int | None
    length: int
    entry: IndexNode | None


class Insertion(NamedTuple):
    """What :meth:`PrefixIndex.insert` did: ``match`` is the whole sequence's entry (lock it to keep the
    sequence), ``nodes`` the index nodes made for its new tokens, ``new_tokens`` how many tokens they hold,
    ``duplicate_tokens`` the tokens that were already indexed on other cache nodes."""

    match: Match
    nodes: list
    new_tokens: int
    duplicate_tokens: int


class Eviction(NamedTuple):
    """What :meth:`PrefixIndex.evict` (or :meth:`~PrefixIndex.clear`) removed, for the caller to apply.

    ``release``: cache nodes the index no longer reads (release them); ``truncate``: ``(node, end)`` for
    cache nodes whose indexed tail was evicted (keep positions ``[.., end)``, free their pages from page
    index ``ceil(end / page_size)`` on); ``pages``: the pages freed (sorted); ``tokens``: tokens evicted;
    ``evicted``: the evicted :class:`IndexNode` s, in eviction order (``cache_node``, ``start``, ``end``,
    ``stamp``... as they were)."""

    release: list
    truncate: list
    pages: list
    tokens: int
    evicted: list


class IndexNode:
    """One edge of a key's radix tree. Read its fields; change it only through :class:`PrefixIndex`.

    ``tokens`` (int64 ``[end - start]``), ``start``/``end`` (path positions), ``cache_node``, ``pages`` (the
    physical pages of its positions), ``hidden`` (pages of its cache path before ``start`` that no index
    ancestor holds), ``parent``, ``children`` (first token -> node), ``locks``, ``stamp`` (last use),
    ``serial`` (creation order), ``born`` (the serial under which its tokens were first indexed: a split keeps
    it), ``key`` (the canonical key), ``evicted``.
    """

    __slots__ = ("owner", "key", "serial", "born", "parent", "children", "tokens", "start", "cache_node", "pages",
                 "hidden", "locks", "stamp", "evicted")

    def __init__(self, owner, key, serial, parent, tokens, start, cache_node, pages, hidden=()):
        self.owner, self.key, self.serial, self.born, self.parent = owner, key, serial, serial, parent
        self.children: dict[int, IndexNode] = {}
        self.tokens, self.start, self.cache_node = tokens, start, cache_node
        self.pages, self.hidden = tuple(pages), tuple(hidden)
        self.locks, self.stamp, self.evicted = 0, 0, False

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def held_pages(self) -> tuple:
        return self.pages + self.hidden

    def __repr__(self) -> str:
        return (f"IndexNode(serial={self.serial}, cache_node={self.cache_node}, start={self.start}, end={self.end}, "
                f"pages={list(self.pages)}, hidden={list(self.hidden)}, locks={self.locks}, stamp={self.stamp})")


class PrefixLock:
    """A held lock on an index node and its ancestors; give it back with :meth:`PrefixIndex.unlock`."""

    __slots__ = ("entry", "held")

    def __init__(self, entry):
        self.entry, self.held = entry, True


# ---- argument checks ----------------------------------------------------------------------------------

_KEY_TYPES = "None, str, bytes, int, bool or a tuple of them"


def canonical_key(key, name: str = "key"):
    """``key`` as a tagged tuple in which values of different types never compare equal."""
    if key is None:
        return ("none",)
    if isinstance(key, (bool, np.bool_)):
        return ("bool", bool(key))
    if isinstance(key, (int, np.integer)):
        return ("int", int(key))
    if isinstance(key, str):
        return ("str", key)
    if isinstance(key, bytes):
        return ("bytes", key)
    if isinstance(key, tuple):
        return ("tuple", tuple(canonical_key(k, name) for k in key))
    raise ValueError(f"{name}: expected {_KEY_TYPES}, got {type(key).__name__} {key!r}")


def as_tokens(tokens, name: str = "tokens") -> np.ndarray:
    """A fresh int64 copy of a 1-D sequence of non-negative token ids (list, tuple, numpy array, tensor)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer token ids, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    elif isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__"):
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got {type(tokens).__name__}")
    elif not isinstance(tokens, np.ndarray):
        types = set(map(type, tokens))  # (one C-level pass: a bool would pass as the token id 0 or 1)
        if types & {bool, np.bool_}:
            raise ValueError(f"{name}: expected integer token ids, got a bool")
        if types <= {int} and len(tokens):
            try:
                tokens = np.array(tokens, dtype=np.int64)
            except OverflowError:
                raise ValueError(f"{name}: expected token ids in [0, 2**63), got {max(tokens)}") from None
        else:
            tokens = np.asarray(tokens) if len(tokens) else np.zeros(0, dtype=np.int64)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected a 1-D sequence of integer token ids, got {tokens.dtype} of shape "
                         f"{list(tokens.shape)}")
    if tokens.size and (tokens.min() < 0 or (tokens.dtype.kind == "u" and tokens.max() > np.iinfo(np.int64).max)):
        raise ValueError(f"{name}: expected token ids in [0, 2**63), got {tokens.min()}..{tokens.max()}")
    return np.array(tokens, dtype=np.int64, copy=True)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int64 arrays (one vectorized comparison, no per-token objects)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- the index ----------------------------------------------------------------------------------------


class PrefixIndex:
    """Token radix index over the nodes of a paged KV cache with ``page_size`` tokens per page (see the
    module docstring for the semantics)."""

    def __init__(self, page_size: int):
        self.page_size = check_int("page_size", page_size, 1)
        self._roots: dict[tuple, IndexNode] = {}
        self._serial = 0
        self._clock = 0
        self._refs: dict[int, int] = {}  # page -> index nodes holding it
        self._pins: dict[int, int] = {}  # page -> locked index nodes holding it
        self._cache_refs: dict[int, tuple] = {}  # cache node -> (its key, index nodes reading it)
        self._evictable: dict[int, IndexNode] = {}  # serial -> unlocked leaf
        self._num_nodes = 0
        self._cached_tokens = 0
        self._counters = dict(prompt_tokens=0, hit_tokens=0, evicted_tokens=0)

    # ---- bookkeeping of pages, cache nodes and candidates ----

    def _hold(self, pages, locked: bool) -> None:
        for p in pages:
            self._refs[p] = self._refs.get(p, 0) + 1
            if locked:
                self._pins[p] = self._pins.get(p, 0) + 1

    def _drop(self, pages, locked: bool, freed: list | None = None) -> None:
        for p in pages:
            self._refs[p] -= 1
            if locked:
                self._pins[p] -= 1
                if not self._pins[p]:
                    del self._pins[p]
            if not self._refs[p]:
                del self._refs[p]
                if freed is not None:
                    freed.append(p)

    def _new_node(self, key, tokens, start, cache_node, pages, hidden=()) -> IndexNode:
        """A detached index node holding its pages (unlocked) and counted in the statistics."""
        hidden = tuple(p for p in hidden if p not in pages)  # a graft starting mid-page holds that page once
        n = IndexNode(self, key, self._serial, None, tokens, start, cache_node, pages, hidden)
        self._serial += 1
        self._num_nodes += 1
        self._cached_tokens += len(tokens)
        self._cache_refs[cache_node] = (key, self._cache_refs.get(cache_node, (key, 0))[1] + 1)
        self._hold(n.held_pages(), False)
        return n

    def _new_root(self, key) -> IndexNode:
        root = IndexNode(self, key, self._serial, None, np.zeros(0, dtype=np.int64), 0, None, ())
        self._serial += 1
        self._roots[key] = root
        return root

    def _update_candidate(self, n: IndexNode) -> None:
        if n.parent is not None and not n.children and not n.locks and not n.evicted:
            self._evictable[n.serial] = n
        else:
            self._evictable.pop(n.serial, None)

    def _attach(self, parent: IndexNode, child: IndexNode) -> None:
        parent.children[int(child.tokens[0])] = child
        child.parent = parent
        self._update_candidate(parent)
        self._update_candidate(child)

    def _pages_of(self, pages: tuple, seg_start: int, start: int, end: int) -> tuple:
        """The ids, from a list starting at page index ``seg_start // page_size``, of positions [start, end)."""
        s, first = self.page_size, seg_start // self.page_size
        return tuple(pages[start // s - first: _ceil_div(end, s) - first])

    def _split(self, n: IndexNode, at: int) -> IndexNode:
        """Cut ``n`` after ``at`` of its tokens; the new upper node takes the first ``at``, ``n`` keeps the rest
        (so handles to ``n`` stay valid) and every lock on ``n`` now also holds the upper node."""
        parent, locked = n.parent, n.locks > 0
        cut = n.start + at
        upper = self._new_node(n.key, n.tokens[:at].copy(), n.start, n.cache_node,
                               self._pages_of(n.pages, n.start, n.start, cut), n.hidden)
        self._cached_tokens -= at  # the tokens move, they are not new
        upper.locks, upper.stamp, upper.born = n.locks, n.stamp, n.born
        if locked:
            self._pin(upper, +1)
        # n keeps only the pages of its remaining positions; the upper node took the hidden ones.
        lower_pages = self._pages_of(n.pages, n.start, cut, n.end)
        self._hold(lower_pages, locked)
        self._drop(n.held_pages(), locked)
        n.tokens, n.start, n.pages, n.hidden = n.tokens[at:].copy(), cut, lower_pages, ()
        del parent.children[int(upper.tokens[0])]
        self._attach(parent, upper)
        self._attach(upper, n)
        return upper

    def _touch(self, n: IndexNode) -> None:
        n.stamp = self._clock

    # ---- queries ----

    def match(self, key, tokens) -> Match:
        """Longest cached prefix of ``tokens`` under ``key``, token by token, at most ``len(tokens) - 1``
        tokens. Counts ``prompt_tokens`` and ``hit_tokens``, and marks the walked nodes as used."""
        ckey = canonical_key(key)
        toks = as_tokens(tokens)
        self._counters["prompt_tokens"] += len(toks)
        limit = max(len(toks) - 1, 0)
        node, pos = self._roots.get(ckey), 0
        if node is None or limit == 0:
            return Match(None, 0, None)
        self._clock += 1
        while pos < limit:
            child = node.children.get(int(toks[pos]))
            if child is None:
                break
            n = _common_prefix(child.tokens, toks[pos:limit])
            self._touch(child)
            node, pos = child, pos + n
            if n < len(child.tokens):
                break
        self._counters["hit_tokens"] += pos
        return Match(node.cache_node, pos, node) if pos else Match(None, 0, None)

    def unhit(self, num_tokens: int) -> None:
        """Count ``num_tokens`` of an earlier match's hit as not used after all (the caller computed them)."""
        self._counters["hit_tokens"] -= check_int("num_tokens", num_tokens, 0, self._counters["hit_tokens"])

    # ---- changes ----

    def _check_path(self, path, length: int) -> list[Segment]:
        """``path`` as Segments running from position 0 to ``length`` without gaps, page lists of the right size."""
        if isinstance(path, (str, bytes)) or not hasattr(path, "__iter__"):
            raise ValueError(
                f"path: expected a sequence of (node, start, end, pages) segments, got {type(path).__name__}")
        segs, seen, pos = [], set(), 0
        for i, seg in enumerate(path):
            if not isinstance(seg, tuple) or len(seg) != 4:
                raise ValueError(f"path[{i}]: expected a (node, start, end, pages) segment, got {seg!r}")
            node = check_int(f"path[{i}].node", seg[0], 0)
            start = check_int(f"path[{i}].start", seg[1], 0)
            end = check_int(f"path[{i}].end", seg[2], start)
            if start != pos:
                raise ValueError(f"path[{i}].start: expected {pos} (where the path so far ends), got {start}")
            if node in seen:
                raise ValueError(f"path[{i}].node: expected each cache node once on a path, got node {node} again")
            if isinstance(seg[3], (str, bytes)) or not hasattr(seg[3], "__iter__"):
                raise ValueError(f"path[{i}].pages: expected a sequence of page ids, got {type(seg[3]).__name__}")
            pages = tuple(check_int(f"path[{i}].pages", p, 0) for p in seg[3])
            want = _ceil_div(end, self.page_size) - start // self.page_size if end > start else 0
            if len(pages) != want:
                raise ValueError(f"path[{i}].pages: expected {want} page ids (positions [{start}, {end}) with "
                                 f"page_size {self.page_size}), got {len(pages)}")
            segs.append(Segment(node, start, end, pages))
            seen.add(node)
            pos = end
        if pos != length:
            raise ValueError(f"path: expected segments covering [0, {length}) (len(tokens)), got [0, {pos})")
        return [s for s in segs if s.end > s.start]

    def insert(self, key, tokens, path) -> Insertion:
        """Record that ``tokens`` (their KV) live on the cache path ``path`` (:class:`Segment` s from position
        0 to ``len(tokens)``) under ``key``. Tokens already indexed keep their cache nodes; the new ones get
        index nodes, split at the path's node boundaries. Marks the walked nodes as used."""
        ckey = canonical_key(key)
        toks = as_tokens(tokens)
        segs = self._check_path(path, len(toks))
        for seg in segs:
            owner = self._cache_refs.get(seg.node)
            if owner is not None and owner[0] != ckey:
                raise ValueError(f"path: expected cache nodes of key {key!r}, got node {seg.node}, indexed under "
                                 "another key (a cache node's KV belongs to one key)")
        if not len(toks):
            return Insertion(Match(None, 0, None), [], 0, 0)
        root = self._roots.get(ckey) or self._new_root(ckey)
        self._clock += 1
        node, pos, duplicate = root, 0, 0
        while pos < len(toks):
            child = node.children.get(int(toks[pos]))
            if child is None:
                break
            n = _common_prefix(child.tokens, toks[pos:])
            if n < len(child.tokens):
                child = self._split(child, n)
            duplicate += sum(min(s.end, pos + n) - max(s.start, pos) for s in segs
                             if s.node != child.cache_node and s.start < pos + n and s.end > pos)
            self._touch(child)
            node, pos = child, pos + n
        hidden: tuple = ()
        if pos and pos < len(toks) and node.cache_node != self._segment_at(segs, pos - 1).node:
            hidden = self._hidden_pages(segs, node, pos)
        made = []
        for seg in segs:
            if seg.end <= pos:
                continue
            a = max(pos, seg.start)
            child = self._new_node(ckey, toks[a:seg.end].copy(), a, seg.node,
                                   self._pages_of(seg.pages, seg.start, a, seg.end), hidden)
            hidden = ()
            self._touch(child)
            self._attach(node, child)
            made.append(child)
            node, pos = child, seg.end
        return Insertion(Match(node.cache_node, len(toks), node), made, sum(len(m.tokens) for m in made), duplicate)

    @staticmethod
    def _segment_at(segs: list[Segment], position: int) -> Segment:
        return next(s for s in segs if s.start <= position < s.end)

    def _hidden_pages(self, segs: list[Segment], node: IndexNode, pos: int) -> tuple:
        """Pages of the path over [0, pos) that no index node from the root to ``node`` holds."""
        held = set()
        m = node
        while m is not None:
            held.update(m.held_pages())
            m = m.parent
        own = set()
        for seg in segs:
            if seg.start < pos:
                own.update(self._pages_of(seg.pages, seg.start, seg.start, min(seg.end, pos)))
        return tuple(sorted(own - held))

    def lock(self, match) -> PrefixLock:
        """Lock the index node ``match`` (a :class:`Match` or :class:`Insertion`) ended in, and its ancestors:
        none of them is evicted until :meth:`unlock`. An empty match gives a lock that holds nothing."""
        if isinstance(match, Insertion):
            match = match.match
        if not isinstance(match, Match):
            raise ValueError(f"match: expected a Match (from match/insert), got {type(match).__name__}")
        entry = match.entry
        if entry is not None:
            if entry.owner is not self:
                raise ValueError("match: expected a Match of this index, got one of another index")
            if entry.evicted:
                raise ValueError(f"match: expected a Match whose tokens are still cached, got one evicted since "
                                 f"(cache node {entry.cache_node}, positions [{entry.start}, {entry.end}))")
            m = entry
            while m.parent is not None:
                m.locks += 1
                if m.locks == 1:
                    self._pin(m, +1)
                    self._update_candidate(m)
                m = m.parent
        return PrefixLock(entry)

    def unlock(self, lock: PrefixLock) -> None:
        """Give back a lock from :meth:`lock` (once)."""
        if not isinstance(lock, PrefixLock):
            raise ValueError(f"lock: expected a PrefixLock (from lock), got {type(lock).__name__}")
        if not lock.held:
            raise ValueError("lock: expected a held lock, got one already unlocked")
        if lock.entry is not None and lock.entry.owner is not self:
            raise ValueError("lock: expected a lock of this index, got one of another index")
        lock.held = False
        m = lock.entry
        while m is not None and m.parent is not None:
            m.locks -= 1
            if m.locks == 0:
                self._pin(m, -1)
                self._update_candidate(m)
            m = m.parent

    def _pin(self, n: IndexNode, step: int) -> None:
        for p in n.held_pages():
            c = self._pins.get(p, 0) + step
            if c:
                self._pins[p] = c
            else:
                del self._pins[p]

    def evictable_pages(self) -> int:
        """Pages that evicting every unlocked node would free: held by index nodes, none of them locked."""
        return len(self._refs) - len(self._pins)

    def evictable_page_ids(self) -> set[int]:
        """The pages :meth:`evictable_pages` counts (the cache may still have other readers of some)."""
        return {p for p in self._refs if p not in self._pins}

    def evict(self, num_pages: int) -> Eviction:
        """Evict unlocked leaves, least recently used first, until at least ``num_pages`` pages are freed; evict
        nothing when fewer than ``num_pages`` are evictable."""
        num_pages = check_int("num_pages", num_pages, 0)
        if num_pages == 0 or num_pages > self.evictable_pages():
            return Eviction([], [], [], 0, [])
        return self._evict_until(lambda freed: len(freed) >= num_pages)

    def _evict_until(self, done) -> Eviction:
        heap = [(n.stamp, n.serial, n) for n in self._evictable.values()]
        heapq.heapify(heap)
        freed: list[int] = []
        evicted, cut = [], {}
        while heap and not done(freed):
            _, _, n = heapq.heappop(heap)
            parent = self._remove(n, freed, cut)
            evicted.append(n)
            if parent.serial in self._evictable:
                heapq.heappush(heap, (parent.stamp, parent.serial, parent))
        eviction = self._eviction(cut, freed, evicted)
        self._counters["evicted_tokens"] += eviction.tokens
        return eviction

    def _remove(self, n: IndexNode, freed: list, cut: dict) -> IndexNode:
        """Take the unlocked leaf ``n`` out of the index (its pages no node holds any more go to ``freed``, its
        cache node's cut to ``cut``); returns its parent."""
        parent = n.parent
        self._drop(n.held_pages(), False, freed)
        del parent.children[int(n.tokens[0])]
        self._evictable.pop(n.serial, None)
        n.evicted = True
        self._num_nodes -= 1
        self._cached_tokens -= len(n.tokens)
        key, count = self._cache_refs[n.cache_node]
        self._cache_refs[n.cache_node] = (key, count - 1)
        cut[n.cache_node] = min(cut.get(n.cache_node, n.start), n.start)
        if parent.parent is None and not parent.children:
            del self._roots[parent.key]
        self._update_candidate(parent)
        return parent

    def _eviction(self, cut: dict, freed: list, evicted: list) -> Eviction:
        release = sorted(c for c in cut if not self._cache_refs[c][1])
        for c in release:
            del self._cache_refs[c]
        truncate = sorted((c, e) for c, e in cut.items() if c in self._cache_refs)
        return Eviction(release, truncate, sorted(freed), sum(len(n.tokens) for n in evicted), evicted)

    def mark(self) -> int:
        """A point to :meth:`forget` back to: the tokens indexed from now on can be taken out again."""
        return self._serial

    def forget(self, mark: int) -> Eviction:
        """Take out every token first indexed since ``mark`` (from :meth:`mark`): the undo of the inserts since
        then (an edge split since stays split; its tokens are unchanged). Their nodes must be unlocked. Not
        counted as evicted."""
        mark = check_int("mark", mark, 0, self._serial)
        doomed = [n for n in self.nodes() if n.born >= mark]
        locked = [n for n in doomed if n.locks]
        if locked:
            raise ValueError(f"mark: expected the tokens indexed since to be unlocked, got {len(locked)} locked "
                             f"node(s) (cache node {locked[0].cache_node})")
        freed: list[int] = []
        cut: dict = {}
        doomed.sort(key=lambda n: -n.start)  # (a child starts where its parent ends: children go first)
        for n in doomed:
            self._remove(n, freed, cut)
        return self._eviction(cut, freed, doomed)

    def clear(self) -> Eviction:
        """Evict every unlocked node and reset the counters (locked paths stay cached)."""
        eviction = self._evict_until(lambda freed: False)
        self._counters = dict.fromkeys(self._counters, 0)
        return eviction

    # ---- inspection ----

    def nodes(self) -> list[IndexNode]:
        """Every index node (roots excluded), in creation order."""
        out, stack = [], list(self._roots.values())
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.parent is not None:
                out.append(n)
        return sorted(out, key=lambda n: n.serial)

    def root(self, key) -> IndexNode | None:
        """The root of ``key``'s radix tree (its ``children`` the first edges; empty ``tokens``), or None when
        nothing was cached under ``key``. Read it; change nothing through it."""
        return self._roots.get(canonical_key(key))

    def path_tokens(self, n: IndexNode) -> np.ndarray:
        """The tokens of the root→``n`` path, int64 ``[n.end]``."""
        runs = []
        while n is not None:
            runs.append(n.tokens)
            n = n.parent
        return np.concatenate(runs[::-1])

    def stats(self) -> dict:
        """``prompt_tokens``, ``hit_tokens``, ``cached_tokens``, ``evicted_tokens``, ``cached_pages``,
        ``evictable_pages``, ``locked_pages``, ``nodes``, ``keys`` (see the module docstring)."""
        return {
            **self._counters,
            "cached_tokens": self._cached_tokens,
            "cached_pages": len(self._refs),
            "evictable_pages": self.evictable_pages(),
            "locked_pages": len(self._pins),
            "nodes": self._num_nodes,
            "keys": len(self._roots),
        }
