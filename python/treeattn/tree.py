"""The node tree behind :class:`treeattn.TreeKVCache`: nodes, their paths and slots, and the arrays a plan
walk hands the planner.

A **node** holds a run of consecutive tokens that continues its parent's path; a branch is the root→node
path. Node ``X`` covers path positions ``[X.start, X.end)`` (``X.start`` = its parent's end) and keeps the
ids of the pages that hold them, page indices ``start // page_size .. ceil(end / page_size) - 1``. A path's
page at index ``j`` is the page of the deepest node on the path that covers ``j``; token ``p`` of a path
lives in flat slot ``page * page_size + p % page_size``.

Node ids are ints handed out in creation order and never reused. A released node is gone for callers at once;
it stays in the tree as an internal node only while some live node's path reads a page through it: every
page a node holds is read by a live path (see :meth:`NodeTree.release`), so the pages in use are exactly the
pages the live paths read. Which pages exist and who may write where is the page allocator's business
(:mod:`treeattn.pages`); the tree only records the page lists it is given.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Node", "NodeTree", "PlanWalk"]

_END = operator.attrgetter("end")

class Node:
    """One node. Read its fields; change nodes only through :class:`NodeTree`.

    ``id``; ``parent`` (a :class:`Node`, None for a root); ``children`` (id -> Node, in creation order);
    ``start``/``end`` (path positions it covers); ``pages`` (int32 ``array`` of its page ids: the planner
    reads them in place); ``released``.
    """

    __slots__ = ("id", "parent", "children", "start", "end", "pages", "released")

    def __init__(self, node_id: int, parent: Node | None, start: int, end: int, pages: array):
        self.id = node_id
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.start = start
        self.end = end
        self.pages = pages
        self.released = False

    def __repr__(self) -> str:
        parent = None if self.parent is None else self.parent.id
        return f"Node(id={self.id}, parent={parent}, start={self.start}, end={self.end}, pages={list(self.pages)})"


class PlanWalk(NamedTuple):
    """The part of the tree a plan's queries reach, in the form :func:`treeattn.plan.plan_from_tree` takes.

    Query ``q`` attends path positions ``[0, query_end[q])`` of the walked node ``query_owner[q]`` (-1 with
    ``query_end[q] == 0``: empty KV). Walked node ``i`` has ``parent[i]`` (-1: none walked), covers
    ``[start[i], end[i])`` in ``pages[i]``. ``reused``: the walk's structure came from the previous call.
    """

    parent: list[int]
    start: list[int]
    end: list[int]
    pages: list[array]
    query_owner: list[int]
    query_end: list[int]
    reused: bool


class _Walk:
    """The structure of a plan walk (everything but the ends, which grow every step).

    Each query's owner is the deepest node on its path holding its last position. The walked subtree is the
    owners and their ancestors, numbered in the order the walks up from the owners first reach them, so
    siblings are planned in the order the queries reach them.

    Reuse across decode steps: parent links and starts never change and a live node's ancestors are never
    removed, so for the same nodes and query count only the owners could differ, and a query owned by its own
    node stays so as the node grows (ends only grow). ``reusable`` says every query is owned by its own node.
    """

    __slots__ = ("nodes", "k", "marked", "parent", "owner", "start", "pages", "reusable")

    def __init__(self, nodes: list[Node], k: int, q_end: list[int]):
        self.nodes, self.k = nodes, k
        index: dict[Node, int] = {}
        marked: list[Node] = []
        parent: list[int] = []
        owner: list[int] = []
        reusable = True
        for n, e in zip(nodes if k == 1 else [n for n in nodes for _ in range(k)], q_end):
            if not e:
                owner.append(-1)
                reusable = False
                continue
            m = n
            while m.start >= e:
                m = m.parent
                reusable = False
            i = index.get(m)
            if i is None:  # number m, then its ancestors up to the first one already numbered
                i = len(marked)
                while True:
                    index[m] = len(marked)
                    marked.append(m)
                    m = m.parent
                    up = -1 if m is None else index.get(m, len(marked))  # len(marked): m is next
                    parent.append(up)
                    if up != len(marked):
                        break
            owner.append(i)
        self.marked, self.parent, self.owner, self.reusable = marked, parent, owner, reusable
        self.start = [m.start for m in marked]
        self.pages = [m.pages for m in marked]  # array('i') objects: appends grow them in place


class NodeTree:
    """A forest of :class:`Node` over pages of ``page_size`` slots."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._nodes: dict[int, Node] = {}  # every node in the tree, released internal ones included
        self._live: dict[int, Node] = {}  # the nodes callers may still use
        self._pins: dict[int, int] = {}  # node id -> pins: a pinned node's path stays readable (a cached sequence)
        self._next_id = 0
        # Counts every change but growth inside pages a node already holds (nodes made or removed, pages taken
        # or given back, starts and ends moved by a release): while it stands, a plan of the same nodes differs
        # from the last one in lengths only.
        self.version = 0
        self._last_walk: _Walk | None = None
        # The last list of ints nodes() resolved (its own copy) and what it found, valid while no release came
        # between (releases counts them).
        self._releases = 0
        self._last_ids: list[int] = []
        self._last_found: list[Node] = []
        self._last_ids_releases = -1

    # ---- lookup ----

    def node(self, node_id, action: str = "node") -> Node:
        """The live node ``node_id``; ValueError naming ``action`` for anything else."""
        if isinstance(node_id, bool) or not isinstance(node_id, (int, np.integer)):
            raise ValueError(f"{action}: expected a node (an int from add/fork), got {node_id!r}")
        n = self._live.get(int(node_id))
        if n is None:
            if 0 <= int(node_id) < self._next_id:
                raise ValueError(f"{action}: node {int(node_id)} was released")
            raise ValueError(f"{action}: unknown node {int(node_id)} (not made by this cache's add/fork)")
        return n

    def nodes(self, node_ids, action: str, arg: str = "nodes") -> list[Node]:
        """Live nodes for one node id or a sequence (or 1-D tensor) of them."""
        if type(node_ids) is list and node_ids == self._last_ids and self._last_ids_releases == self._releases and (
                set(map(type, node_ids)) <= {int}):
            # A decode loop passes the same ints every step: the nodes found for them last time, unless a
            # release (the only way a live node stops being one) came between. (Types are checked: 1.0 == 1.)
            return list(self._last_found)
        if isinstance(node_ids, (int, np.integer)) and not isinstance(node_ids, bool):
            return [self.node(node_ids, action)]
        if isinstance(node_ids, (torch.Tensor, np.ndarray)):
            integral = node_ids.dtype.kind in "iu" if isinstance(node_ids, np.ndarray) else not (
                node_ids.dtype.is_floating_point or node_ids.dtype.is_complex or node_ids.dtype == torch.bool)
            if not integral or node_ids.ndim > 1:
                raise ValueError(f"{arg}: expected a 1-D integer array of nodes, got {node_ids.dtype} of shape "
                                 f"{list(node_ids.shape)}")
            node_ids = node_ids.reshape(-1).tolist()
        elif isinstance(node_ids, (str, bytes)) or not hasattr(node_ids, "__iter__"):
            raise ValueError(f"{arg}: expected a node or a sequence of nodes, got {type(node_ids).__name__}")
        elif isinstance(node_ids, (AbstractSet, Mapping)):  # (query and slot order follow the sequence's)
            raise ValueError(f"{arg}: expected a sequence of nodes (list, tuple, numpy array or 1-D tensor; a set "
                             f"or dict has no defined order), got {type(node_ids).__name__}")
        node_ids = list(node_ids)
        # The common case in C-level passes (this runs every decode step): only ints, all live. A float or a
        # bool would hash as some node's id, so the types are checked, not just the lookups.
        if set(map(type, node_ids)) <= {int}:
            found = list(map(self._live.get, node_ids))
            if None not in found:
                self._last_ids, self._last_found, self._last_ids_releases = node_ids, found, self._releases
                return list(found)
        return [self.node(n, action) for n in node_ids]

    def __contains__(self, node_id) -> bool:
        """``node_id`` is in the tree (live, or released but still holding a live node's ancestry)."""
        return node_id in self._nodes

    def node_ids(self) -> list[int]:
        """Every node in the tree, released internal ones included, in creation order."""
        return sorted(self._nodes)

    def live_ids(self) -> list[int]:
        """The nodes callers may use, in creation order."""
        return sorted(self._live)

    def any_node(self, node_id: int) -> Node:
        """A node in the tree, released internal ones included (KeyError otherwise)."""
        return self._nodes[node_id]

    # ---- changes ----

    def _new(self, parent: Node | None, start: int, end: int, pages: array) -> Node:
        n = Node(self._next_id, parent, start, end, pages)
        self._next_id += 1
        self.version += 1
        self._nodes[n.id] = self._live[n.id] = n
        if parent is not None:
            parent.children[n.id] = n
        return n

    def add_root(self, num_tokens: int, pages: array) -> Node:
        """A root holding path positions ``[0, num_tokens)`` in ``pages``."""
        return self._new(None, 0, num_tokens, pages)

    def fork(self, parent: Node, n: int) -> list[Node]:
        """``n`` children of ``parent`` holding no tokens yet (their paths are the parent's)."""
        return [self._new(parent, parent.end, parent.end, array("i")) for _ in range(n)]

    @staticmethod
    def check_growable(nodes: list[Node], action: str, arg: str = "leaves") -> None:
        """Each node may grow: a leaf (its tokens are nobody's prefix), listed once."""
        seen = set()
        for n in nodes:
            if n.children:
                raise ValueError(
                    f"{action}: node {n.id} has children (its tokens are shared); {action} to a leaf, "
                    f"e.g. fork({n.id}, 1)"
                )
            if n.id in seen:
                raise ValueError(f"{action}: node {n.id} appears twice in {arg}")
            seen.add(n.id)

    def tail_page(self, n: Node) -> int:
        """The page holding the path's last token (the path must hold at least one token)."""
        while n.end == n.start:
            n = n.parent
        return n.pages[-1]

    def grow(self, n: Node, pages, num_tokens: int) -> None:
        """Leaf ``n`` holds ``num_tokens`` more positions; ``pages`` are the ones it newly holds."""
        if pages:
            n.pages.extend(pages)
            self.version += 1
        n.end += num_tokens

    def release(self, n: Node) -> list[tuple[array, int]]:
        """Release ``n``: callers can no longer use it. Returns the runs of pages no reader's path reads any
        more, as ``(pages, start)`` (the pages, and the path position their first page is claimed from), for
        the allocator to take back."""
        n.released = True
        del self._live[n.id]
        self._releases += 1
        self.version += 1
        return self._settle(n)

    def _is_reader(self, n: Node) -> bool:
        """``n``'s path must stay readable: a live node, or a pinned one (a cached sequence). The one place
        that says who reads."""
        return not n.released or n.id in self._pins

    def pin(self, n: Node) -> None:
        """``n``'s path stays readable, released or not, until as many :meth:`unpin` calls."""
        self._pins[n.id] = self._pins.get(n.id, 0) + 1

    def pinned(self, n: Node) -> bool:
        return n.id in self._pins

    def unpin(self, n: Node) -> list[tuple[array, int]]:
        """Give back a :meth:`pin`; returns the page runs nobody reads any more (as :meth:`release` does)."""
        if self._pins[n.id] > 1:
            self._pins[n.id] -= 1
            return []
        del self._pins[n.id]
        self.version += 1
        return self._settle(n)

    def branch(self, n: Node, end: int, pages: array) -> Node:
        """A new leaf beside ``n`` (a child of ``n``'s parent) holding ``n``'s positions ``[n.start, end)`` in
        ``pages`` (shared with ``n`` or copies of its pages): its path is ``n``'s path cut at ``end``."""
        return self._new(n.parent, n.start, end, pages)

    def cut_back(self, n: Node, end: int) -> list[tuple[array, int]]:
        """``n`` keeps positions ``[n.start, end)``, ``end`` at least every child's start; returns the page run
        it gives up (the pages from page index ``ceil(end / page_size)`` on, a whole-page run)."""
        s = self.page_size
        keep = -(-end // s) - n.start // s if end > n.start else 0
        freed = array("i", n.pages[keep:])
        del n.pages[keep:]
        n.end = end
        self.version += 1
        self._last_walk = None  # (ends and page lists changed under it)
        return [(freed, (n.start // s + keep) * s if keep else n.start)] if freed else []

    def _settle(self, n: Node) -> list[tuple[array, int]]:
        """Trim the tree above ``n``, a node that just stopped being a reader, so that every page a node holds
        is read by some reader's path through it. Walking up while the node is no reader:

        - without children: it is removed with its pages;
        - without tokens: it is spliced out (its children continue its parent);
        - ending mid-page in a page none of its children continues in place (each copied it on write, so no
          path through it reads that page): its tokens in that page already sit in every child's copy, so
          they become the children's (each child now starts where the node's last full page ends, or where
          the node starts) and the node gives the page up, which may leave it without tokens.

        Anything else is read by some path and stops the walk. Only releases make pages unreadable: an append
        to a child of such a node continues its page in place (the first child to leave a page does)."""
        freed: list[tuple[array, int]] = []
        s = self.page_size
        while n is not None and not self._is_reader(n):
            parent = n.parent
            if not n.children:
                freed.append((n.pages, n.start))
                if parent is not None:
                    del parent.children[n.id]
                del self._nodes[n.id]
                n.pages = array("i")
            elif n.start == n.end:
                for kid in n.children.values():
                    kid.parent = parent
                    if parent is not None:
                        parent.children[kid.id] = kid
                if parent is not None:
                    del parent.children[n.id]
                del self._nodes[n.id]
                n.children = {}
                self._last_walk = None  # (a reused walk may pass through n)
            elif n.end % s and all(kid.pages and kid.pages[0] != n.pages[-1] for kid in n.children.values()):
                end = max(n.start, n.end - n.end % s)
                freed.append((array("i", [n.pages.pop()]), end))
                n.end = end
                for kid in n.children.values():
                    kid.start = end
                self._last_walk = None  # (starts and page lists changed under it)
                continue  # n may be left without tokens
            else:
                break
            n = parent
        return freed

    # ---- slots ----

    def slots(self, n: Node) -> np.ndarray:
        """int64 flat slots of the node's own path positions ``[start, end)``."""
        s = self.page_size
        pos = np.arange(n.start, n.end, dtype=np.int64)
        return np.asarray(n.pages, dtype=np.int64)[pos // s - n.start // s] * s + pos % s

    def grow_slots(self, nodes: list[Node], new_pages, num_tokens: int) -> np.ndarray:
        """int64 flat slots of each node's next ``num_tokens`` positions once it grows by ``new_pages[i]``
        (:meth:`grow`'s arguments), node-major; the tree is not changed. Plain ints per position: a decode step
        asks for a few per node, where a numpy pass per node would cost more than the arithmetic."""
        s = self.page_size
        out = []
        for n, extra in zip(nodes, new_pages):
            pages, first, held = n.pages, n.start // s, len(n.pages)
            for p in range(n.end, n.end + num_tokens):
                j = p // s - first
                out.append((pages[j] if j < held else extra[j - held]) * s + p % s)
        return np.array(out, dtype=np.int64)

    def path_pages(self, n: Node) -> np.ndarray:
        """int64 page ids of the root→n path (indices ``0 .. ceil(n.end / page_size) - 1``).

        Gathered by a walk up from ``n`` on every call: O(nodes on the path + path pages) time, nothing kept
        (a cache per node would hold a whole path array at every node: quadratic memory on deep chains)."""
        s = self.page_size
        out = np.empty(-(-n.end // s), dtype=np.int64)
        limit = len(out)  # indices [limit, ...) are written: a deeper node covering an index wins
        m = n
        while m is not None and limit:
            first = m.start // s
            if m.pages and limit > first:
                out[first:limit] = np.frombuffer(m.pages, dtype=np.int32, count=limit - first)
                limit = first
            m = m.parent
        return out

    def path_slots(self, n: Node) -> np.ndarray:
        """int64 flat slots of every token on the root→n path, in order."""
        s = self.page_size
        pos = np.arange(n.end, dtype=np.int64)
        return self.path_pages(n)[pos // s] * s + pos % s

    # ---- planning and accounting ----

    def plan_walk(self, nodes: list[Node], num_tokens: int = 1, *, reuse: bool = True) -> PlanWalk:
        """What the planner needs for queries on ``nodes``: query ``i * num_tokens + j`` attends node
        ``nodes[i]``'s path up to and including its ``j``-th of the last ``num_tokens`` tokens (causal).
        Every node must hold at least ``num_tokens`` tokens on its path when ``num_tokens > 1``.

        With ``reuse`` the structure of the previous call's walk is kept when it still holds (same nodes, same
        ``num_tokens``, every query owned by its own node), so a decode loop that plans the same nodes every
        step walks the tree once."""
        k = num_tokens
        q_end = self.query_ends(nodes, k)
        walk = self._last_walk if reuse else None
        reused = walk is not None and walk.k == k and walk.nodes == nodes  # (== compares nodes by identity)
        if not reused:
            walk = _Walk(nodes, k, q_end)
            if reuse:
                self._last_walk = walk if walk.reusable else None
        return PlanWalk(walk.parent, walk.start, [m.end for m in walk.marked], walk.pages, walk.owner, q_end, reused)

    @staticmethod
    def query_ends(nodes: list[Node], num_tokens: int = 1) -> list[int]:
        """Path length each query of :meth:`plan_walk` attends: node-major, a node's last ``num_tokens`` ends."""
        k = num_tokens
        return list(map(_END, nodes)) if k == 1 else [e for n in nodes for e in range(n.end - k + 1, n.end + 1)]

    def counts(self) -> dict:
        """``nodes``, ``live_nodes``, ``leaves``, ``tokens_stored`` (each once), and ``tokens_if_unshared`` /
        ``pages_if_unshared`` (what one private cache per leaf, holding its whole path, would hold)."""
        s = self.page_size
        leaves = [n for n in self._nodes.values() if not n.children]
        return {
            "nodes": len(self._nodes),
            "live_nodes": len(self._live),
            "leaves": len(leaves),
            "tokens_stored": sum(n.end - n.start for n in self._nodes.values()),
            "tokens_if_unshared": sum(n.end for n in leaves),
            "pages_if_unshared": sum(-(-n.end // s) for n in leaves),
        }
