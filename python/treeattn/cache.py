"""TreeKVCache: the shared-prefix paged KV cache a tree decode loop drives.

Branches fork from a prompt, grow and die; their KV lives in one paged pool where a token shared by several
branches is stored once. This module is the front: it owns the device pool, checks every argument, and
composes two host-side parts, each usable and testable alone:

- :class:`treeattn.tree.NodeTree`: the nodes (a node continues its parent's path by a run of tokens), their
  paths and flat slots, and the arrays the planner walks;
- :class:`treeattn.pages.PageAllocator`: reference counts, fills, the free list, and when a branch leaving a
  shared, partially filled page copies it (copy on write) or continues it in place.

The pool lives on the device, all layers in one tensor:

- GQA: ``[2, num_layers, num_pages, page_size, num_kv_heads, head_dim]`` (K and V stacked);
- MLA: ``[1, num_layers, num_pages, page_size, kv_lora_rank + rope_dim]``.

``layer(i)`` returns a :class:`KVLayer`: layer ``i``'s views keyed by the decode op's keyword names, so every
pool is read as ``tree_decode(q, **cache.layer(i), plan=plan)`` (``mla_tree_decode`` for MLA).

An FP8 pool (``dtype=torch.float8_e4m3fn`` / ``float8_e5m2``, half the bytes of bf16) holds ``value / scale``
with fixed fp32 scales given at construction (per tensor, per KV head, or per layer and KV head); ``write``
takes 16/32-bit K/V and quantizes them in its one launch, and ``layer(i)`` also holds the layer's scales.

All copies one ``append`` needs happen in one launch (every layer, K and V); ``write`` is one launch per
layer. Writes must follow the order a decode loop has anyway: write a node's KV (``add``/``append`` slots,
every layer) before a child appends past a shared partially filled page, since the copy on write copies what
the page holds at that moment.

Every public method either does what it says or raises (``ValueError``, ``TypeError`` or
:class:`OutOfPages`, naming the argument) leaving the cache exactly as it was.
"""

from __future__ import annotations

import weakref
from array import array
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from . import kv_ops  # (also registers the treeattn::kv_write_run / copy_pages_run ops)
from ._validate import check_device, check_float_tensor, check_int, check_kv_scale, is_fp8
from .pages import OutOfPages, PageAllocator
from .plan import LastTreePlan, PlanCapacity, TreePlan, plan_from_tree
from .tree import NodeTree

__all__ = ["TreeKVCache", "KVLayer", "OutOfPages", "StepWriter"]

# ---- argument checks ----------------------------------------------------------------------------------


def _resolve_device(device) -> torch.device:
    """``None``: the current CUDA device when CUDA is available, else the CPU. CUDA devices get their index."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return check_device(device)


class _KnownSlots:
    """The last GPU slot tensors the cache made or already range-checked, so :meth:`TreeKVCache.write` does not
    sync to check them again. A tensor counts as known while it is the same object at the same version (an
    in-place change of it, or of a view of it, bumps the version). Inference tensors keep no version counter
    and count as known by identity alone (the cache makes its own slot tensors outside inference mode). What
    no version counter sees (a change through ``.data``, DLPack, a raw pointer) is caught by the write's
    device-side check instead."""

    def __init__(self, size: int = 32):
        self._size = size
        self._entries: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()

    @staticmethod
    def version(t: torch.Tensor) -> int:
        """``t``'s version counter (-1 for an inference tensor, which has none)."""
        try:
            return t._version
        except RuntimeError:  # an inference tensor
            return -1

    def add(self, t: torch.Tensor) -> torch.Tensor:
        self._entries[id(t)] = (weakref.ref(t), self.version(t))
        self._entries.move_to_end(id(t))
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return t

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == self.version(t)


class KVLayer(Mapping):
    """One layer of a :class:`TreeKVCache`'s pool, as the decode op of its kind takes it: a read-only mapping
    whose keys are exactly that op's keyword names, so ``**cache.layer(i)`` fits every pool.

    - GQA: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads, head_dim]``, plus ``k_scale``,
      ``v_scale`` (fp32 ``[num_kv_heads]``) for an FP8 pool: ``treeattn.tree_decode(q, **layer, plan=plan)``;
    - MLA: ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]``, plus ``kv_scale`` (fp32 ``[1]``) for
      an FP8 pool: ``treeattn.mla_tree_decode(q, **layer, plan=plan, sm_scale=s)``.

    Values are views of the pool (writing through them changes the cache). Attribute access works too
    (``layer.k_cache``); the mapping itself cannot be changed.
    """

    __slots__ = ("_views",)

    def __init__(self, views: dict[str, torch.Tensor]):
        object.__setattr__(self, "_views", dict(views))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._views[name]

    def __iter__(self):
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __getattr__(self, name: str) -> torch.Tensor:
        # (only called for names the class does not have; _views itself is looked up without recursing)
        try:
            return object.__getattribute__(self, "_views")[name]
        except (KeyError, AttributeError):
            raise AttributeError(f"KVLayer has no {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("KVLayer is read-only")

    def __repr__(self) -> str:
        parts = (f"{k}=<{tuple(v.shape)} {v.dtype}>" for k, v in self._views.items())
        return f"KVLayer({', '.join(parts)})"


def _plain(*tensors) -> bool:
    """Plain tensors (or None) take the eager path; subclasses (fake tensors, ...) go through the registered op."""
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def _rows_layout(k, v) -> tuple:
    """What a prepared write depends on in its rows besides their data."""
    return (type(k), k.shape, k.stride(), k.dtype, k.device,
            None if v is None else (type(v), v.shape, v.stride(), v.dtype, v.device))


class StepWriter:
    """The writes of one step's layers, all to one slot tensor (made by :meth:`TreeKVCache.writer`, which
    checks the slots once). ``writer(layer, k, v)`` (MLA: ``writer(layer, kv)``) is
    ``cache.write(layer, slots, k, v)``: the first call checks the rows and prepares the launch (backend,
    grid, arguments); a later call with rows of the same layout checks the layer index and launches, and one
    with any other layout is checked in full (the same errors as ``write``). Under ``torch.compile`` and for
    tensor subclasses every call is ``write``.

    The slots are not checked again per layer: a change of their values during the step that no version
    counter sees is the caller's (the write kernels skip any slot outside the layer, so it never writes out of
    bounds; ``write`` re-checks per call on the CPU)."""

    __slots__ = ("_cache", "_slots", "_layout", "_write", "_version")

    def __init__(self, cache: TreeKVCache, slots: torch.Tensor):
        self._cache, self._slots = cache, slots
        self._layout, self._write = None, None
        self._version = _KnownSlots.version(slots)

    @property
    def slots(self) -> torch.Tensor:
        return self._slots

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        cache = self._cache
        if type(layer) is not int or not 0 <= layer < cache.num_layers:
            layer = cache._check_layer(layer)
        if self._layout is None or _rows_layout(k, v) != self._layout or torch.compiler.is_compiling():
            self._prepare(k, v)
            if self._write is None:  # (compiling, or tensor subclasses: write itself)
                cache.write(layer, self._slots, k, v)
                return
        if _KnownSlots.version(self._slots) != self._version:  # changed in place since checked: check again
            cache._check_slots(self._slots)
            self._version = _KnownSlots.version(self._slots)
        self._write(layer, k, v)

    def _prepare(self, k, v) -> None:
        cache, slots = self._cache, self._slots
        self._layout, self._write = None, None
        if torch.compiler.is_compiling() or not _plain(slots, k, v, cache._pool):
            return
        cache._check_write_rows(k, v, slots.shape[0])
        self._write = kv_ops.prepare_kv_write(slots, k, v, cache._pool, cache._planes(), *cache._write_scales())
        self._layout = _rows_layout(k, v)


# ---- the cache ----------------------------------------------------------------------------------------


class TreeKVCache:
    """Paged KV pool for tree-structured decoding: reference-counted pages, fork, append, copy on write.

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV shape.
        page_size: tokens per page.
        num_pages: pool size (every layer has this many pages; a page id names the same page in all layers).
        dtype: of the pool (a floating dtype; ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` store FP8).
        device: of the pool; default: the current CUDA device when CUDA is available, else the CPU.
        k_scale, v_scale: FP8 pools only (required there): the true K is ``pool.to(float32) * k_scale``. A
            finite positive float, or an fp32 tensor ``[]`` / ``[1]`` (every layer and head), ``[num_kv_heads]``
            (per head, every layer) or ``[num_layers, num_kv_heads]``. Fixed for the cache's life.

    Nodes are ints. Typical decode loop::

        cache = treeattn.TreeKVCache(L, Hkv, D, num_pages=4096)
        root = cache.add(len(prompt)); slots = cache.slots(root)      # prefill: write every layer
        leaves = cache.fork(root, n)
        while ...:
            slots = cache.append(leaves)                                # one new token per leaf
            plan = cache.plan(leaves)                                   # once per step
            write = cache.writer(slots)                  # the step's writes (or cache.write(i, slots, k_i, v_i))
            for i in range(L):
                write(i, k_i, v_i)
                o = treeattn.tree_decode(q_i, **cache.layer(i), plan=plan)
            ...; cache.release(dead_leaf); kids = cache.fork(leaf, 2)

    ``tree`` (:class:`treeattn.tree.NodeTree`) and ``allocator`` (:class:`treeattn.pages.PageAllocator`) are
    the cache's bookkeeping, there to read (inspection, tests); change the cache through its methods only.
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
        device: torch.device | str | None = None,
        k_scale: torch.Tensor | float | None = None,
        v_scale: torch.Tensor | float | None = None,
    ):
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, 1)
        head_dim = check_int("head_dim", head_dim, 1)
        self._setup(num_layers, (num_kv_heads, head_dim), 2, page_size, num_pages, dtype, device,
                    (("k_scale", k_scale), ("v_scale", v_scale)), num_kv_heads)
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
        device: torch.device | str | None = None,
        kv_scale: torch.Tensor | float | None = None,
    ) -> TreeKVCache:
        """MLA cache (absorbed form): one latent row ``c_kv (kv_lora_rank) ‖ k_pe (rope_dim)`` per token.
        ``layer(i)`` holds the ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]`` that
        ``treeattn.mla_tree_decode`` takes (``mla_tree_decode(q, **cache.layer(i), plan=plan, sm_scale=s)``);
        ``write(layer, slots, kv)`` takes ``kv [n, kv_lora_rank + rope_dim]``. An FP8 ``dtype`` needs
        ``kv_scale``: a finite positive float or an fp32 tensor ``[]`` / ``[1]`` (every layer) or
        ``[num_layers]``; ``layer(i)`` then also holds ``kv_scale``."""
        kv_lora_rank = check_int("kv_lora_rank", kv_lora_rank, 1)
        rope_dim = check_int("rope_dim", rope_dim, 0)
        self = cls.__new__(cls)
        self._setup(num_layers, (kv_lora_rank + rope_dim,), 1, page_size, num_pages, dtype, device,
                    (("kv_scale", kv_scale),), None)
        self.is_mla = True
        self.num_kv_heads = 1
        self.head_dim = kv_lora_rank + rope_dim
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        return self

    def _setup(self, num_layers, row_shape, planes, page_size, num_pages, dtype, device, scales, num_heads):
        self.num_layers = check_int("num_layers", num_layers, 1)
        # Flat slots and page ids travel as int32 in plans: a page id must fit, and so must a slot.
        self.page_size = check_int("page_size", page_size, 1, 2**31 - 1)
        self.num_pages = check_int("num_pages", num_pages, 1, (2**31 - 1) // self.page_size)
        self.dtype = self._check_dtype(dtype)
        device = _resolve_device(device)
        self._row_shape = tuple(row_shape)
        self._pool = torch.empty(
            (planes, self.num_layers, self.num_pages, self.page_size, *row_shape), dtype=self.dtype, device=device
        )
        self.device = self._pool.device
        self._scales = self._check_scales(scales, num_heads)
        self.tree = NodeTree(self.page_size)
        self.allocator = PageAllocator(self.num_pages, self.page_size)
        # The last plan, and what it was asked for: the next plan of the same request, with only growth inside
        # pages between (the tree's version unchanged), is patched from it.
        self._last_plan = LastTreePlan()
        self._last_plan_request: tuple | None = None
        self._known_slots = _KnownSlots()
        self._layer_planes = None  # see _planes

    def _check_scales(self, scales, num_heads: int | None) -> tuple[torch.Tensor, ...] | None:
        """FP8 pools: each scale as an fp32 tensor ``[num_layers, H]`` on the pool's device (``H``: KV heads, 1
        for MLA), values checked once here; None for 16/32-bit pools (which take no scales)."""
        layer0 = self._pool[0, 0]
        for name, scale in scales:
            check_kv_scale(name, scale, layer0, "cache", num_heads, num_layers=self.num_layers,
                           read_device_values=True)
        if not is_fp8(self.dtype):
            return None
        out = []
        for _, scale in scales:
            t = torch.as_tensor(scale, dtype=torch.float32, device=self.device)
            if t.dim() < 2:  # one value, per head (GQA [H]) or per layer (MLA [num_layers])
                t = t.reshape(-1, 1) if num_heads is None else t.reshape(1, -1)
            rows = torch.empty(self.num_layers, num_heads or 1, dtype=torch.float32, device=self.device)
            out.append(rows.copy_(t.expand_as(rows)))  # a copy: the scales are fixed for the cache's life
        return tuple(out)

    @staticmethod
    def _check_dtype(dtype) -> torch.dtype:
        """The pool's storage dtype (the one place that says which dtypes a cache can hold)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        return dtype

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _slots_out(self, slots: np.ndarray) -> torch.Tensor:
        """Slots handed to the caller: on the device, and (on a GPU) known valid to :meth:`write`. Made outside
        inference mode, so that they keep a version counter that in-place changes bump."""
        with torch.inference_mode(False):
            t = self._to_device(slots)
        return self._known_slots.add(t) if t.is_cuda else t

    # ---- tree ----

    def add(self, num_tokens: int) -> int:
        """A new root node holding ``num_tokens`` fresh slots (e.g. a prompt; write them with ``slots(root)``)."""
        num_tokens = check_int("num_tokens", num_tokens, 0)
        pages = self.allocator.allocate(num_tokens, "add")
        return self.tree.add_root(num_tokens, pages).id

    def fork(self, node: int, n: int) -> list[int]:
        """``n`` new children of ``node``, each sharing every token of ``node``'s path (no pages used yet).
        ``n`` is at most ``num_pages * page_size``: more children than the pool has slots could never all grow,
        and a runaway count must fail here rather than exhaust host memory."""
        parent = self.tree.node(node, "fork")
        n = check_int("n", n, 0, self.num_pages * self.page_size)
        return [kid.id for kid in self.tree.fork(parent, n)]

    def append(self, leaves, num_tokens: int = 1) -> torch.Tensor:
        """Grow each leaf by ``num_tokens`` slots; returns their int64 flat slots (``page * page_size + offset``),
        leaf-major: ``[len(leaves) * num_tokens]`` on the cache's device, for :meth:`write`.

        A leaf whose path ends mid-page continues in that page in place when no other node has claimed its next
        slots, else in a copy of it (copy on write; all copies of the call in one launch). Raises
        :class:`OutOfPages` (cache unchanged) when the free pages do not suffice.
        """
        nodes = self.tree.nodes(leaves, "append", "leaves")
        k = check_int("num_tokens", num_tokens, 1)
        self.tree.check_growable(nodes, "append")
        s = self.page_size
        branches = [(n.end, self.tree.tail_page(n) if n.end % s else -1, n.end > n.start) for n in nodes]
        growth = self.allocator.grow(branches, k, "append")  # decides, changes nothing (or raises OutOfPages)
        if growth.copy_src:  # into pages still free: if the launch fails, the cache is as it was
            copies = (growth.copy_src, growth.copy_dst, growth.copy_slots)
            torch.ops.treeattn.copy_pages_run(self._pool, *(self._to_device(np.asarray(x)) for x in copies))
        slots = self.tree.grow_slots(nodes, growth.new_pages, k)
        out = self._slots_out(slots)  # (the last step that can fail: an allocation)
        self.allocator.commit(growth)
        for n, pages in zip(nodes, growth.new_pages):
            self.tree.grow(n, pages, k)
        return out

    def release(self, node: int) -> None:
        """Release ``node``: it can no longer be used. Every page that no live node's path reads any more goes
        back to the free list: the node's own pages once no live descendant needs them, and the last, partly
        filled page of a released ancestor once each live path below it reads its own copy of that page (the
        ancestor's tokens in it then count as the copying children's own: see :meth:`slots`). So the pages in
        use are always exactly the pages the live paths read."""
        for pages, start in self.tree.release(self.tree.node(node, "release")):
            self.allocator.release(pages, start)

    # ---- cached sequences (what a prefix cache needs) ----

    def _any_node(self, node, action: str):
        """A node still in the tree, live or not (a pinned released node included)."""
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or int(node) not in self.tree:
            raise ValueError(f"{action}: expected a node in the cache's tree (live or pinned), got {node!r}")
        return self.tree.any_node(int(node))

    def pin(self, node: int) -> None:
        """Keep ``node``'s path readable (its pages held) even once released, until :meth:`unpin`: a cached
        sequence. Pins count."""
        self.tree.pin(self._any_node(node, "pin"))

    def unpin(self, node: int) -> None:
        """Give back one :meth:`pin`; a released node nobody reads any more then frees its pages."""
        n = self._any_node(node, "unpin")
        if not self.tree.pinned(n):
            raise ValueError(f"unpin: expected a pinned node, got node {n.id} (not pinned)")
        for pages, start in self.tree.unpin(n):
            self.allocator.release(pages, start)

    def fork_at(self, node: int, position: int) -> int:
        """A new live leaf whose path is ``node``'s path cut at ``position`` (``node`` live or pinned,
        ``0 < position <= length``): at ``node``'s end a child (:meth:`fork`); inside it a leaf beside it holding
        ``node``'s tokens up to ``position``, sharing its whole pages and copying (one launch) the page the cut
        falls in and a first page ``node`` shares with its parent. Raises :class:`OutOfPages` (cache unchanged)
        when the copies do not fit."""
        n = self._any_node(node, "fork_at")
        position = check_int("position", position, 1, n.end)
        while position <= n.start:  # the cut lies on an ancestor's tokens
            n = n.parent
        if position == n.end:
            return self.tree.fork(n, 1)[0].id
        s = self.page_size
        first = n.start // s
        src, private, fills = [], [], []
        for j in range(first, -(-position // s)):
            lo, hi = max(j * s, n.start), min((j + 1) * s, position)
            src.append(n.pages[j - first])
            # A page is shared only where the new leaf holds it whole, so the allocator's fill bookkeeping (which
            # reads a node's first page as continued in place from its start) never sees a shared first page.
            if lo > j * s or hi < (j + 1) * s:
                private.append(len(src) - 1)
                fills.append(hi - j * s)
        if len(private) > self.allocator.num_free:
            raise OutOfPages(len(private), self.allocator.num_free, "fork_at")
        if private:  # into pages still free: if the launch fails, the cache is as it was
            dst = self.allocator.free_pages()[: len(private)]
            torch.ops.treeattn.copy_pages_run(
                self._pool, *(self._to_device(np.asarray(x)) for x in ([src[i] for i in private], dst, fills)))
        taken = iter(self.allocator.take(fills, "fork_at"))
        pages = list(src)
        for i in private:
            pages[i] = next(taken)
        shared = set(range(len(src))) - set(private)
        self.allocator.share([src[i] for i in sorted(shared)])
        return self.tree.branch(n, position, array("i", pages)).id

    def cut_back(self, node: int, end: int) -> int:
        """Cut the released, pinned ``node`` back to path length ``end`` (never below a child's start, where
        a path through it reads on: that start is used instead); frees its pages from page index
        ``ceil(end / page_size)`` on. Returns the length kept."""
        n = self._any_node(node, "cut_back")
        if not n.released:
            raise ValueError(f"cut_back: expected a released (cached) node, got live node {n.id}")
        end = check_int("end", end, n.start, n.end)
        end = max([end, *(kid.start for kid in n.children.values())])
        if end < n.end:
            for pages, start in self.tree.cut_back(n, end):
                self.allocator.release(pages, start)
        return end

    # ---- slots and pools ----

    def slots(self, node: int) -> torch.Tensor:
        """int64 flat slots of the node's own tokens (path positions ``[start, end)``), on the cache's device.

        A node owns the tokens appended to it (``add``'s for a root); when a released ancestor's last page is
        read by none of the live paths through it, the tokens of that page before the node's first one move to
        the node's copy of the page and are its own from then on (``start`` moves back, within that page)."""
        return self._slots_out(self.tree.slots(self.tree.node(node, "slots")))

    def path_slots(self, node: int) -> torch.Tensor:
        """int64 flat slots of every token on the root→node path, in order, on the cache's device. A walk up
        the path: O(nodes on it + its pages) time, no memory kept between calls."""
        return self._slots_out(self.tree.path_slots(self.tree.node(node, "path_slots")))

    def length(self, node: int) -> int:
        """Tokens on the root→node path."""
        return self.tree.node(node, "length").end

    def parent(self, node: int) -> int | None:
        """The node's parent (None for a root): the nearest ancestor still in the tree. A released ancestor stays
        while some live path reads a page through it, and one left without tokens leaves the tree."""
        p = self.tree.node(node, "parent").parent
        return None if p is None else p.id

    def _check_layer(self, layer) -> int:
        return check_int("layer", layer, 0, self.num_layers - 1)

    def layer(self, i: int) -> KVLayer:
        """Layer ``i``'s pool views, keyed by the keyword names of the decode op they feed (see
        :class:`KVLayer`): ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads, head_dim]`` for GQA,
        ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]`` for MLA; FP8 pools add the layer's fp32
        scales, ``k_scale``, ``v_scale`` ``[num_kv_heads]`` (``kv_scale [1]`` for MLA). Every pool is used the
        same way::

            treeattn.tree_decode(q, **cache.layer(i), plan=plan)
            treeattn.mla_tree_decode(q, **cache.layer(i), plan=plan, sm_scale=s)
        """
        i = self._check_layer(i)
        names = ("kv_cache",) if self.is_mla else ("k_cache", "v_cache")
        views = {name: self._pool[c, i] for c, name in enumerate(names)}
        if self._scales is not None:
            scale_names = ("kv_scale",) if self.is_mla else ("k_scale", "v_scale")
            views.update((name, scale[i]) for name, scale in zip(scale_names, self._scales))
        return KVLayer(views)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """One launch scattering ``k, v [len(slots), num_kv_heads, head_dim]`` into layer ``layer`` at ``slots``
        (MLA: ``write(layer, slots, kv)`` with ``kv [len(slots), kv_lora_rank + rope_dim]``). A negative slot
        is skipped (padding); a slot ``>= num_pages * page_size`` is an error. Into an FP8 pool, 16/32-bit
        rows are quantized in the same launch: ``x / scale`` saturated to the format's range, rounded to
        nearest even (``treeattn.reference.quantize``).

        The slot range is never silently skipped. On the CPU every call checks it on the host (one pass,
        cheaper than the write). On a GPU the host check (a synchronisation) runs the first time a tensor is
        seen, not for the cache's own slot tensors (``append``/``slots``/``path_slots``) nor again for one
        already checked while it is unchanged in place; every GPU write also checks on the device, without a
        synchronisation, so a change no version counter saw fails a device-side assertion. Under CUDA-graph
        capture and ``torch.compile`` only the device-side check runs (it is part of the graph). See
        docs/validation.md.
        """
        layer = self._check_layer(layer)
        self._check_slots(slots)
        self._check_write_rows(k, v, slots.shape[0])
        if torch.compiler.is_compiling() or not _plain(slots, k, v, self._pool):
            torch.ops.treeattn.kv_write_run(slots, k, v, self._pool, layer, *self._write_scales())
        else:  # plain tensors in eager mode: the op's body without its dispatch
            kv_ops.kv_write(slots, k, v, self._pool, layer, *self._write_scales())

    def writer(self, slots: torch.Tensor) -> StepWriter:
        """The writes of one step's layers to ``slots``: ``w = cache.writer(slots)``, then ``w(layer, k, v)``
        (MLA: ``w(layer, kv)``) for each layer does what ``write(layer, slots, k, v)`` does. The slots are
        checked here, once for all layers (the CPU's host check, or on a GPU the host check of a tensor not
        known and one device-side check); the first write checks its rows and prepares the launch, and a later
        write whose rows are laid out the same way (type, shape, strides, dtype, device) only launches (any
        other layout is checked in full). See :class:`StepWriter`."""
        self._check_slots(slots)
        return StepWriter(self, slots)

    def _write_scales(self) -> tuple:
        """An FP8 pool's ``(k_scale, v_scale)`` as the write ops take them (None for a 16/32-bit pool)."""
        scales = self._scales or ()
        return (scales[0] if scales else None), (scales[1] if len(scales) > 1 else None)

    def _planes(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Each layer's pool planes (``[num_pages, page_size, ...]`` views: K and V, or the latent rows),
        made once: the pool never moves."""
        if self._layer_planes is None:
            self._layer_planes = tuple(layer.unbind(0) for layer in self._pool.unbind(1))
        return self._layer_planes

    def _check_write_rows(self, k, v, n: int) -> None:
        if self.is_mla:
            if v is not None:
                raise ValueError("v: an MLA cache stores one latent row per token: call write(layer, slots, kv)")
            self._check_rows("kv", k, n)
        else:
            if v is None:
                raise ValueError("v: expected a tensor (GQA caches take write(layer, slots, k, v))")
            self._check_rows("k", k, n)
            self._check_rows("v", v, n)

    def _check_slots(self, slots) -> None:
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            got = (f"dtype {slots.dtype}, shape {list(slots.shape)}" if isinstance(slots, torch.Tensor)
                   else type(slots).__name__)
            raise ValueError(f"slots: expected a 1-D torch.int64 tensor (from append/slots), got {got}")
        if slots.device != self.device:
            raise ValueError(f"slots: expected device {self.device} (the cache's), got {slots.device}")
        if slots.shape[0] > 1 and slots.stride(0) != 1:
            raise ValueError(f"slots: expected a contiguous tensor, got stride {slots.stride(0)}")
        n, limit = slots.shape[0], self.num_pages * self.page_size
        if (torch.compiler.is_compiling() or (slots.is_cuda and torch.cuda.is_current_stream_capturing())
                or (slots.is_cuda and slots in self._known_slots)):
            # No host check here (none can see the values a replay will use; a known tensor skips the sync), so
            # the device checks, without a sync: a value no host check saw (a replay, a traced graph, a change the
            # version counter missed) fails loudly instead of the kernel skipping its row.
            if n:
                torch._assert_async(slots.max() < limit, f"slots: expected values < {limit} (num_pages * page_size)")
            return
        if n:
            # On the CPU this pass costs less than the write itself, so it runs on every call: no change of the
            # tensor (through .numpy(), .data, inference mode) can slip past it. On a GPU it costs a sync, paid the
            # first time a tensor is seen.
            top = int(slots.max())
            if top >= limit:
                raise ValueError(
                    f"slots: expected values < {limit} (num_pages * page_size; a negative slot is skipped), got {top}"
                )
        if slots.is_cuda:
            self._known_slots.add(slots)

    def _check_rows(self, name: str, t, n: int) -> None:
        shape = (n, *self._row_shape)
        check_float_tensor(name, t, len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name}: expected shape {list(shape)} ([len(slots), ...] of the cache), got {list(t.shape)}"
            )
        if not is_fp8(self.dtype) and t.dtype != self.dtype:  # (an FP8 pool takes any 16/32-bit rows)
            raise ValueError(f"{name}: expected dtype {self.dtype} (the cache's), got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the cache's), got {t.device}")

    # ---- planning ----

    def plan(self, nodes, num_tokens: int = 1, *, num_qo_heads: int | None = None, num_sms: int | None = None,
             capacity: PlanCapacity | None = None, into: TreePlan | None = None) -> TreePlan:
        """The decode step's :class:`TreePlan`, built from the tree the cache already knows (no re-detection).

        Query ``i * num_tokens + j`` (node-major, as :meth:`append` lays out slots) attends node ``nodes[i]``'s
        root→node path up to and including its ``j``-th of the last ``num_tokens`` tokens (causal), so
        ``plan(leaves, num_tokens=k)`` verifies ``k`` tokens appended to each leaf. Any live nodes work, internal
        ones too: a speculative draft tree of 1-token nodes is ``plan(draft_nodes)``. ``num_qo_heads`` sizes
        query blocks (``num_kv_heads`` is the cache's; 1 for MLA); any plan is exact for any head count.
        ``capacity`` makes a fixed-capacity plan (see :class:`treeattn.PlanCapacity`); ``into=`` such a plan
        (made by this cache, or one with its page size) refills its buffers in place instead of making a new
        plan, so a CUDA graph captured over ``tree_decode(..., plan)`` replays every later step of a changing tree.

        A decode step that plans the same nodes as the last call, after each only grew inside its last page,
        patches the last plan's lengths into a copy of it (or into ``into=`` that plan itself) instead of walking
        the tree again; plans already returned never change.
        """
        node_list = self.tree.nodes(nodes, "plan")
        # (types in the request: 1 == True, but a bool is no head count and must reach the checks)
        request = (node_list, num_tokens, type(num_tokens), self.tree.version, num_qo_heads, type(num_qo_heads),
                   num_sms, type(num_sms), capacity, into is None)
        if request == self._last_plan_request:
            patched = self._last_plan.patched(self.tree.query_ends(node_list, num_tokens), into)
            if patched is not None:
                return patched
        self._last_plan_request = None
        k = check_int("num_tokens", num_tokens, 1)
        if k > 1:  # (one query over an empty path is fine: empty KV, output 0)
            for n in node_list:
                if n.end < k:
                    raise ValueError(f"plan: node {n.id} has {n.end} tokens on its path, fewer than num_tokens={k}")
        walk = self.tree.plan_walk(node_list, k)
        plan = plan_from_tree(
            parent=walk.parent, start=walk.start, end=walk.end, pages=walk.pages,
            query_owner=walk.query_owner, query_end=walk.query_end, page_size=self.page_size,
            num_qo_heads=num_qo_heads, num_kv_heads=self.num_kv_heads, device=self.device, num_sms=num_sms,
            capacity=capacity, into=into, last=self._last_plan,
        )
        self._last_plan_request = request
        return plan

    # ---- accounting ----

    def stats(self) -> dict:
        """Pool use and the sharing it buys.

        ``pages_used``/``pages_free``/``num_pages``; ``tokens_stored`` (tokens the tree holds, each once),
        ``tokens_if_unshared`` and ``pages_if_unshared`` (what one cache per leaf, holding its whole path,
        would hold); ``bytes_per_page`` (all layers, K and V), ``bytes_used``, ``bytes_if_unshared``,
        ``memory_saved`` (``1 - pages_used / pages_if_unshared``); ``nodes`` (in the tree, released internal
        ones included), ``live_nodes``, ``leaves``; ``pages_copied`` (copies on write so far).
        """
        tree = self.tree.counts()
        pages_used, pages_if_unshared = self.allocator.num_used, tree["pages_if_unshared"]
        bytes_per_page = self._pool[:, :, 0].numel() * self._pool.element_size()
        return {
            "num_pages": self.num_pages,
            "pages_used": pages_used,
            "pages_free": self.allocator.num_free,
            "tokens_stored": tree["tokens_stored"],
            "tokens_if_unshared": tree["tokens_if_unshared"],
            "pages_if_unshared": pages_if_unshared,
            "bytes_per_page": bytes_per_page,
            "bytes_used": pages_used * bytes_per_page,
            "bytes_if_unshared": pages_if_unshared * bytes_per_page,
            "memory_saved": 1.0 - pages_used / pages_if_unshared if pages_if_unshared else 0.0,
            "nodes": tree["nodes"],
            "live_nodes": tree["live_nodes"],
            "leaves": tree["leaves"],
            "pages_copied": self.allocator.pages_copied,
        }

    def __repr__(self) -> str:
        kind = (
            f"mla(kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim})" if self.is_mla
            else f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        )
        return (
            f"TreeKVCache(num_layers={self.num_layers}, {kind}, page_size={self.page_size}, "
            f"num_pages={self.num_pages}, pages_free={self.allocator.num_free}, dtype={self.dtype}, "
            f"device={self.device})"
        )
