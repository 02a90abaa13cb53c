"""TreeKVCache: the shared-prefix paged KV cache a tree decode loop drives (DESIGN §2).

Branches fork from a prompt, grow and die; their KV lives in one paged pool where a token shared by several
branches is stored once. The cache is a tree of **nodes**: a node holds a run of consecutive tokens that
continues its parent's path; a branch is the root→node path. Host-side bookkeeping (numpy, Python) tracks
pages; the pool itself lives on the device:

- GQA: one tensor ``[2, num_layers, num_pages, page_size, num_kv_heads, head_dim]`` (K and V stacked), so
  ``layer(i)`` returns the ``(k_cache, v_cache)`` views ``tree_decode`` takes;
- MLA: ``[1, num_layers, num_pages, page_size, kv_lora_rank + rope_dim]``, ``layer(i)`` the ``kv_cache``.

Pages and sharing. Node ``X`` covers path positions ``[X.start, X.end)`` (``X.start`` = its parent's end);
its page list covers page indices ``start // page_size .. ceil(end / page_size) - 1``. A path's page at index
``j`` is the page of the deepest node on the path that covers ``j``. A node that starts mid-page begins in
the page its path already ends in: it writes there **in place** if no other node has claimed the next
slots of that page (the page's ``fill``), else it **copies the page on write** (the slots before its
start) into a fresh page. All copies one ``append`` needs happen in one launch (for every layer, K and V).
A page's reference count is the number of nodes whose page list holds it; it is free at zero.

A released node is gone for the caller at once; its pages stay while a live descendant's path needs them
(the node stays in the tree as an internal node until its last descendant is released).

Writes must follow the order a decode loop has anyway: write a node's KV (``add``/``append`` slots, every
layer) before a child appends past a shared partially filled page, since the copy on write copies what the
page holds at that moment.
"""

from __future__ import annotations

from array import array
from typing import Optional

import numpy as np
import torch

from . import _dispatch
from ._dispatch import register
from ._validate import check_float_tensor
from .plan import PlanCapacity, TreePlan, plan_from_tree

__all__ = ["TreeKVCache", "OutOfPages"]

_EMPTY = np.zeros(0, dtype=np.int64)


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a call needs; the cache is unchanged.

    Attributes: ``pages_needed`` (what the call needed), ``pages_free`` (what was free).
    """

    def __init__(self, pages_needed: int, pages_free: int, what: str = ""):
        self.pages_needed = int(pages_needed)
        self.pages_free = int(pages_free)
        super().__init__(
            f"TreeKVCache{'.' + what if what else ''}: out of pages: needs {self.pages_needed} pages, "
            f"{self.pages_free} free (release nodes or create the cache with more num_pages); the cache is unchanged"
        )


# ---- registered ops: one launch each, dispatched like the attention ops -------------------------------


@register("kv_write", "cuda")
def _kv_write_cuda(slots, k, v, pool, layer):
    torch.ops.treeattn.kv_write_cuda(slots, k, v, pool, layer)


@register("kv_write", "triton")
def _kv_write_triton(slots, k, v, pool, layer):
    # pool: the stacked [C, num_layers, num_pages, page_size, ...] (C = 2 for K/V, 1 for MLA).
    _dispatch.triton_kernels.kv_write(slots, k, pool[0, layer], v, None if v is None else pool[1, layer])


@register("kv_write", "reference")
def _kv_write_reference(slots, k, v, pool, layer):
    keep = slots >= 0
    dst = slots[keep]
    pool[0, layer].flatten(0, 1)[dst] = k[keep]
    if v is not None:
        pool[1, layer].flatten(0, 1)[dst] = v[keep]


@register("copy_pages", "triton")
def _copy_pages_triton(pool, src, dst, num_slots):
    _dispatch.triton_kernels.copy_pages(pool.flatten(0, 1), src, dst, num_slots)


@register("copy_pages", "reference")
def _copy_pages_reference(pool, src, dst, num_slots):
    planes = pool.flatten(0, 1).flatten(1, 2)  # [C * num_layers, num_pages * page_size, ...]
    page_size = pool.shape[3]
    slot = torch.arange(page_size, device=pool.device)
    used = slot[None, :] < num_slots[:, None]
    planes[:, (dst[:, None] * page_size + slot)[used]] = planes[:, (src[:, None] * page_size + slot)[used]]


@torch.library.custom_op("treeattn::kv_write_run", mutates_args=("pool",))
def _kv_write_run(slots: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], pool: torch.Tensor, layer: int) -> None:
    """``pool[0, layer]`` at flat ``slots`` = ``k`` (and ``pool[1, layer]`` = ``v`` for GQA)."""
    _dispatch.run("kv_write", slots.device, slots, k, v, pool, layer)


@_kv_write_run.register_fake
def _(slots, k, v, pool, layer):
    return None


@torch.library.custom_op("treeattn::copy_pages_run", mutates_args=("pool",))
def _copy_pages_run(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, num_slots: torch.Tensor) -> None:
    """For every plane ``(c, layer)`` of the stacked pool: page ``dst[i]``'s first ``num_slots[i]`` slots =
    page ``src[i]``'s."""
    _dispatch.run("copy_pages", pool.device, pool, src, dst, num_slots)


@_copy_pages_run.register_fake
def _(pool, src, dst, num_slots):
    return None


# ---- the cache --------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("id", "parent", "children", "start", "end", "pages", "released", "path", "path_end")

    def __init__(self, node_id: int, parent: "_Node | None", start: int, end: int, pages: array):
        self.id = node_id
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.start = start
        self.end = end
        self.pages = pages  # int32 page ids (array('i'): the planner reads them in place, no conversion)
        self.released = False
        self.path: np.ndarray | None = None  # cached page ids of the root→node path (valid while path_end == end)
        self.path_end = -1


class _Reach:
    """The part of the tree a plan's queries reach, as :func:`plan_from_tree` takes it (ends aside).

    Query ``q`` (node ``nodes[q // k]``, end ``q_end[q]``) attends path positions ``[0, end)``; its owner is the
    deepest node on the path holding position ``end - 1``. The marked subtree is the owners and their
    ancestors, numbered in the order the walks up from the owners first reach them, so siblings are planned
    in the order the queries reach them.

    Reuse across decode steps (TreeKVCache.plan keeps the last one): parent links and starts never change and
    a live node's ancestors are never removed, so for the same nodes and ``k`` only the owners could differ,
    and a query owned by its own node stays so as the node grows (ends only grow). ``reusable`` says every
    query is owned by its own node; the caller reads the ends afresh each step.
    """

    __slots__ = ("nodes", "k", "marked", "parent", "owner", "start", "pages", "reusable")

    def __init__(self, nodes: list[_Node], k: int, q_end: list[int]):
        self.nodes, self.k = nodes, k
        index: dict[_Node, int] = {}  # node -> number
        marked: list[_Node] = []
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


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


class TreeKVCache:
    """Paged KV pool for tree-structured decoding: reference-counted pages, fork, append, copy on write.

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV shape.
        page_size: tokens per page.
        num_pages: pool size (every layer has this many pages; a page id names the same page in all layers).
        dtype, device: of the pool.

    Nodes are ints. Typical decode loop::

        cache = treeattn.TreeKVCache(L, Hkv, D, num_pages=4096, device="cuda")
        root = cache.add(len(prompt)); slots = cache.slots(root)      # prefill: write every layer
        leaves = cache.fork(root, n)
        while ...:
            slots = cache.append(leaves)                                # one new token per leaf
            plan = cache.plan(leaves)                                   # once per step
            for i in range(L):
                cache.write(i, slots, k_i, v_i)
                o = treeattn.tree_decode(q_i, *cache.layer(i), plan)
            ...; cache.release(dead_leaf); kids = cache.fork(leaf, 2)
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        page_size: int = 16,
        num_pages: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
    ):
        num_kv_heads = _check_int("num_kv_heads", num_kv_heads, 1)
        head_dim = _check_int("head_dim", head_dim, 1)
        self._setup(num_layers, (num_kv_heads, head_dim), 2, page_size, num_pages, dtype, device)
        self.is_mla = False
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @classmethod
    def mla(
        cls,
        num_layers: int,
        *,
        kv_lora_rank: int = 512,
        rope_dim: int = 64,
        page_size: int = 64,
        num_pages: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
    ) -> "TreeKVCache":
        """MLA cache (absorbed form): one latent row ``c_kv (kv_lora_rank) ‖ k_pe (rope_dim)`` per token.
        ``layer(i)`` returns the ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]`` that
        ``treeattn.mla_tree_decode`` takes; ``write(layer, slots, kv)`` takes ``kv [n, kv_lora_rank + rope_dim]``."""
        kv_lora_rank = _check_int("kv_lora_rank", kv_lora_rank, 1)
        rope_dim = _check_int("rope_dim", rope_dim, 0)
        self = cls.__new__(cls)
        self._setup(num_layers, (kv_lora_rank + rope_dim,), 1, page_size, num_pages, dtype, device)
        self.is_mla = True
        self.num_kv_heads = 1
        self.head_dim = kv_lora_rank + rope_dim
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        return self

    def _setup(self, num_layers, row_shape, planes, page_size, num_pages, dtype, device):
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.page_size = _check_int("page_size", page_size, 1)
        self.num_pages = _check_int("num_pages", num_pages, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device)
        self._row_shape = tuple(row_shape)
        self._pool = torch.empty(
            (planes, self.num_layers, self.num_pages, self.page_size, *row_shape), dtype=dtype, device=self.device
        )
        self._refcount = np.zeros(self.num_pages, dtype=np.int64)
        self._fill = np.zeros(self.num_pages, dtype=np.int64)  # slots of each page some node has claimed
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._nodes: dict[int, _Node] = {}
        self._next_id = 0
        self._live: dict[int, _Node] = {}  # the nodes callers may still use (not released)
        self._pages_copied = 0
        self._last_reach: _Reach | None = None  # the last plan's marked subtree, reused while it stays valid

    # ---- helpers ----

    def _node(self, node, action: str) -> _Node:
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)):
            raise ValueError(f"{action}: expected a node (an int from add/fork), got {node!r}")
        n = self._nodes.get(int(node))
        if n is None or n.released:
            if 0 <= int(node) < self._next_id:
                raise ValueError(f"{action}: node {int(node)} was released")
            raise ValueError(f"{action}: unknown node {int(node)} (not made by this cache's add/fork)")
        return n

    def _nodes_arg(self, nodes, action: str) -> list[_Node]:
        if isinstance(nodes, (int, np.integer)) and not isinstance(nodes, bool):
            nodes = [nodes]
        if isinstance(nodes, torch.Tensor):
            nodes = nodes.tolist()
        # C-level passes (this runs every decode step); a bool would hash as node 0 or 1.
        found = list(map(self._live.get, nodes))
        if None in found or bool in map(type, nodes):
            return [self._node(n, action) for n in nodes]  # raises the precise error
        return found

    def _new_node(self, parent, start, end, pages) -> _Node:
        n = _Node(self._next_id, parent, start, end, pages)
        self._next_id += 1
        self._nodes[n.id] = self._live[n.id] = n
        if parent is not None:
            parent.children[n.id] = n
        return n

    def _alloc(self, fill: int) -> int:
        page = self._free.pop()
        self._refcount[page] = 1
        self._fill[page] = fill
        return page

    def _tail_page(self, n: _Node) -> int:
        """Page holding the path's last, partially filled page (the path must end mid-page)."""
        while not n.pages or n.end == n.start:
            n = n.parent
        return n.pages[-1]

    def _path_pages(self, n: _Node) -> np.ndarray:
        """int64 page ids of the root→n path (indices ``0 .. ceil(n.end / page_size) - 1``), cached per node."""
        chain = []
        m = n
        while m is not None and m.path_end != m.end:
            chain.append(m)
            m = m.parent
        base = m.path if m is not None else _EMPTY
        for m in reversed(chain):
            if m.pages:
                base = np.concatenate([base[: m.start // self.page_size], np.asarray(m.pages, dtype=np.int64)])
            m.path, m.path_end = base, m.end
        return n.path

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _node_slots(self, n: _Node, begin: int, end: int) -> np.ndarray:
        """Flat slots of path positions [begin, end), all inside node n's range."""
        s = self.page_size
        pos = np.arange(begin, end, dtype=np.int64)
        first = n.start // s
        pages = np.asarray(n.pages[begin // s - first : (end + s - 1) // s - first], dtype=np.int64)
        return pages[pos // s - begin // s] * s + pos % s

    # ---- tree ----

    def add(self, num_tokens: int) -> int:
        """A new root node holding ``num_tokens`` fresh slots (e.g. a prompt; write them with ``slots(root)``)."""
        num_tokens = _check_int("num_tokens", num_tokens, 0)
        s = self.page_size
        need = -(-num_tokens // s)
        if need > len(self._free):
            raise OutOfPages(need, len(self._free), "add")
        pages = array("i", [self._alloc(min(s, num_tokens - i * s)) for i in range(need)])
        return self._new_node(None, 0, num_tokens, pages).id

    def fork(self, node: int, n: int) -> list[int]:
        """``n`` new children of ``node``, each sharing every token of ``node``'s path (no pages used yet)."""
        parent = self._node(node, "fork")
        n = _check_int("n", n, 0)
        return [self._new_node(parent, parent.end, parent.end, array("i")).id for _ in range(n)]

    def append(self, leaves, num_tokens: int = 1) -> torch.Tensor:
        """Grow each leaf by ``num_tokens`` slots; returns their int64 flat slots (``page * page_size + offset``),
        leaf-major: ``[len(leaves) * num_tokens]`` on the cache's device, for :meth:`write`.

        A leaf whose path ends mid-page continues in that page in place when no other node has claimed its next
        slots, else in a copy of it (copy on write; all copies of the call in one launch). Raises
        :class:`OutOfPages` (cache unchanged) when the free pages do not suffice.
        """
        nodes = self._nodes_arg(leaves, "append")
        k = _check_int("num_tokens", num_tokens, 1)
        seen = set()
        for n in nodes:
            if n.children:
                raise ValueError(
                    f"append: node {n.id} has children (its tokens are shared); append to a leaf, e.g. fork({n.id}, 1)"
                )
            if n.id in seen:
                raise ValueError(f"append: node {n.id} appears twice in leaves")
            seen.add(n.id)

        s = self.page_size
        # Plan every leaf's pages first (nothing changes before the page count is known to fit).
        claimed: dict[int, int] = {}
        steps = []
        need = 0
        for n in nodes:
            e = n.end
            off = e % s
            src = -1
            if off:
                tail = self._tail_page(n)
                if claimed.get(tail, int(self._fill[tail])) == off:
                    claimed[tail] = min(s, off + k)  # continue in place
                    src = -2 - tail  # marker: share `tail`
                else:
                    src = tail  # copy on write
                    need += 1
            fresh = -(-(e + k) // s) - -(-e // s)
            need += fresh
            steps.append((n, off, src, fresh))
        if need > len(self._free):
            raise OutOfPages(need, len(self._free), "append")

        copy_src, copy_dst, copy_len = [], [], []
        slots = []
        for n, off, src, fresh in steps:
            e = n.end
            if src <= -2:  # in place in the path's tail page
                tail = -2 - src
                if not n.pages or n.end == n.start:
                    n.pages.append(tail)
                    self._refcount[tail] += 1
                self._fill[tail] = min(s, off + k)
            elif src >= 0:
                page = self._alloc(min(s, off + k))
                n.pages.append(page)
                copy_src.append(src)
                copy_dst.append(page)
                copy_len.append(off)
            first_fresh = k - (min(s - off, k) if off else 0)
            for i in range(fresh):
                n.pages.append(self._alloc(min(s, first_fresh - i * s)))
            n.end = e + k
            slots.append(self._node_slots(n, e, e + k))
        if copy_src:
            self._pages_copied += len(copy_src)
            torch.ops.treeattn.copy_pages_run(
                self._pool,
                self._to_device(np.asarray(copy_src)),
                self._to_device(np.asarray(copy_dst)),
                self._to_device(np.asarray(copy_len)),
            )
        return self._to_device(np.concatenate(slots) if slots else _EMPTY)

    def release(self, node: int) -> None:
        """Release ``node``: it can no longer be used; every page nothing else references is freed. The tokens
        of a node with live descendants stay (their paths need them) until the last of those is released."""
        n = self._node(node, "release")
        n.released = True
        del self._live[n.id]
        while n is not None and n.released and not n.children:
            parent = n.parent
            self._remove(n)
            n = parent

    def _remove(self, n: _Node) -> None:
        s = self.page_size
        for i, page in enumerate(n.pages):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                self._fill[page] = 0
                self._free.append(page)
            elif i == 0 and n.start % s:
                # n continued an ancestor's page in place: its slots from n.start on are unclaimed again.
                self._fill[page] = n.start % s
        if n.parent is not None:
            del n.parent.children[n.id]
        del self._nodes[n.id]
        n.pages, n.path = array("i"), None

    # ---- slots and pools ----

    def slots(self, node: int) -> torch.Tensor:
        """int64 flat slots of the node's own tokens (path positions ``[start, end)``), on the cache's device."""
        n = self._node(node, "slots")
        return self._to_device(self._node_slots(n, n.start, n.end))

    def path_slots(self, node: int) -> torch.Tensor:
        """int64 flat slots of every token on the root→node path, in order, on the cache's device."""
        n = self._node(node, "path_slots")
        s = self.page_size
        pages = self._path_pages(n)
        pos = np.arange(n.end, dtype=np.int64)
        return self._to_device(pages[pos // s] * s + pos % s)

    def length(self, node: int) -> int:
        """Tokens on the root→node path."""
        return self._node(node, "length").end

    def parent(self, node: int) -> int | None:
        """The node's parent (None for a root). A released parent still answers here while it has children."""
        p = self._node(node, "parent").parent
        return None if p is None else p.id

    def _check_layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def layer(self, i: int):
        """Layer ``i``'s pool views: ``(k_cache, v_cache)`` ``[num_pages, page_size, num_kv_heads, head_dim]``
        for GQA, ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]`` for MLA."""
        i = self._check_layer(i)
        if self.is_mla:
            return self._pool[0, i]
        return self._pool[0, i], self._pool[1, i]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """One launch scattering ``k, v [len(slots), num_kv_heads, head_dim]`` into layer ``layer`` at ``slots``
        (MLA: ``write(layer, slots, kv)`` with ``kv [len(slots), kv_lora_rank + rope_dim]``). A negative slot
        is skipped (padding). No host synchronisation; slots are not range-checked on the device."""
        layer = self._check_layer(layer)
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            got = f"dtype {slots.dtype}, shape {list(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"slots: expected a 1-D torch.int64 tensor (from append/slots), got {got}")
        if slots.device != self.device:
            raise ValueError(f"slots: expected device {self.device} (the cache's), got {slots.device}")
        n = slots.shape[0]
        if self.is_mla:
            if v is not None:
                raise ValueError("v: an MLA cache stores one latent row per token: call write(layer, slots, kv)")
            self._check_rows("kv", k, n)
        else:
            if v is None:
                raise ValueError("v: expected a tensor (GQA caches take write(layer, slots, k, v))")
            self._check_rows("k", k, n)
            self._check_rows("v", v, n)
        torch.ops.treeattn.kv_write_run(slots, k, v, self._pool, layer)

    def _check_rows(self, name: str, t, n: int) -> None:
        shape = (n, *self._row_shape)
        check_float_tensor(name, t, len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)} ([len(slots), ...] of the cache), got {list(t.shape)}")
        if t.dtype != self.dtype:
            raise ValueError(f"{name}: expected dtype {self.dtype} (the cache's), got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the cache's), got {t.device}")

    # ---- planning ----

    def plan(self, nodes, num_tokens: int = 1, *, num_qo_heads: int | None = None, num_sms: int = 132,
             capacity: PlanCapacity | None = None, into: TreePlan | None = None) -> TreePlan:
        """The decode step's :class:`TreePlan`, built from the tree the cache already knows (no re-detection).

        Query ``i * num_tokens + j`` (node-major, as :meth:`append` lays out slots) attends node ``nodes[i]``'s
        root→node path up to and including its ``j``-th of the last ``num_tokens`` tokens (causal), so
        ``plan(leaves, num_tokens=k)`` verifies ``k`` tokens appended to each leaf. Any live nodes work, internal
        ones too: a speculative draft tree of 1-token nodes is ``plan(draft_nodes)``. ``num_qo_heads`` sizes
        query blocks (``num_kv_heads`` is the cache's; 1 for MLA); any plan is exact for any head count.
        ``capacity`` makes a fixed-capacity plan (see :class:`treeattn.PlanCapacity`); ``into=`` such a plan
        refills its buffers in place instead of making a new plan, so a CUDA graph captured over
        ``tree_decode(..., plan)`` replays every later step of a changing tree.
        """
        node_list = self._nodes_arg(nodes, "plan")
        k = _check_int("num_tokens", num_tokens, 1)
        if k > 1:  # (one query over an empty path is fine: empty KV, output 0)
            for n in node_list:
                if n.end < k:
                    raise ValueError(f"plan: node {n.id} has {n.end} tokens on its path, fewer than num_tokens={k}")
        # Query i * k + j attends node i's path up to end = length - k + 1 + j (causal over its last k tokens).
        q_end = [n.end for n in node_list] if k == 1 else [e for n in node_list for e in range(n.end - k + 1, n.end + 1)]
        reach = self._last_reach
        if reach is None or reach.k != k or reach.nodes != node_list:  # (!= compares nodes by identity)
            reach = _Reach(node_list, k, q_end)
            self._last_reach = reach if reach.reusable else None
        return plan_from_tree(
            parent=reach.parent, start=reach.start, end=[m.end for m in reach.marked], pages=reach.pages,
            query_owner=reach.owner, query_end=q_end, page_size=self.page_size,
            num_qo_heads=num_qo_heads, num_kv_heads=self.num_kv_heads, device=self.device, num_sms=num_sms,
            capacity=capacity, into=into,
        )

    # ---- accounting ----

    def stats(self) -> dict:
        """Pool use and the sharing it buys.

        ``pages_used``/``pages_free``/``num_pages``; ``tokens_stored`` (tokens the tree holds, each once),
        ``tokens_if_unshared`` and ``pages_if_unshared`` (what one cache per leaf, holding its whole path,
        would hold); ``bytes_per_page`` (all layers, K and V), ``bytes_used``, ``bytes_if_unshared``,
        ``memory_saved`` (``1 - pages_used / pages_if_unshared``); ``nodes`` (in the tree, released internal
        ones included), ``live_nodes``, ``leaves``; ``pages_copied`` (copies on write so far).
        """
        s = self.page_size
        leaves = [n for n in self._nodes.values() if not n.children]
        tokens_if_unshared = sum(n.end for n in leaves)
        pages_if_unshared = sum(-(-n.end // s) for n in leaves)
        pages_used = self.num_pages - len(self._free)
        bytes_per_page = self._pool[:, :, 0].numel() * self._pool.element_size()
        return {
            "num_pages": self.num_pages,
            "pages_used": pages_used,
            "pages_free": len(self._free),
            "tokens_stored": sum(n.end - n.start for n in self._nodes.values()),
            "tokens_if_unshared": tokens_if_unshared,
            "pages_if_unshared": pages_if_unshared,
            "bytes_per_page": bytes_per_page,
            "bytes_used": pages_used * bytes_per_page,
            "bytes_if_unshared": pages_if_unshared * bytes_per_page,
            "memory_saved": 1.0 - pages_used / pages_if_unshared if pages_if_unshared else 0.0,
            "nodes": len(self._nodes),
            "live_nodes": len(self._live),
            "leaves": len(leaves),
            "pages_copied": self._pages_copied,
        }

    def __repr__(self) -> str:
        kind = (
            f"mla(kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim})" if self.is_mla
            else f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        )
        return (
            f"TreeKVCache(num_layers={self.num_layers}, {kind}, page_size={self.page_size}, "
            f"num_pages={self.num_pages}, pages_free={len(self._free)}, dtype={self.dtype}, device={self.device})"
        )
