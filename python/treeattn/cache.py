"""TreeKVCache: the shared-prefix paged KV cache a tree decode loop drives.

Branches fork from a prompt, grow and die; their KV lives in one paged pool where a token shared by several
branches is stored once. This module is the front: it owns the device pool, checks every argument, and
composes two host-side parts, each usable and testable alone:

- :class:`treeattn.tree.NodeTree`: the nodes (a node continues its parent's path by a run of tokens), their
  paths and flat slots, and the arrays the planner walks;
- :class:`treeattn.pages.PageAllocator`: reference counts, fills, the free list, and when a branch leaving a
  shared, partially filled page copies it (copy on write) or continues it in place.

The pool lives on the device, all layers in one tensor:

- GQA: ``[2, num_layers, num_pages, page_size, num_kv_heads, head_dim]`` (K and V stacked), so ``layer(i)``
  returns the ``(k_cache, v_cache)`` views ``tree_decode`` takes;
- MLA: ``[1, num_layers, num_pages, page_size, kv_lora_rank + rope_dim]``, ``layer(i)`` the ``kv_cache``.

An FP8 pool (``dtype=torch.float8_e4m3fn`` / ``float8_e5m2``, half the bytes of bf16) holds ``value / scale``
with fixed fp32 scales given at construction (per tensor, per KV head, or per layer and KV head); ``write``
takes 16/32-bit K/V and quantizes them in its one launch, and ``layer(i)`` also returns the layer's scales.

All copies one ``append`` needs happen in one launch (every layer, K and V); ``write`` is one launch per
layer. Writes must follow the order a decode loop has anyway: write a node's KV (``add``/``append`` slots,
every layer) before a child appends past a shared partially filled page, since the copy on write copies what
the page holds at that moment.

Every public method either does what it says or raises (``ValueError``, ``TypeError`` or
:class:`OutOfPages`, naming the argument) leaving the cache exactly as it was.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from . import _dispatch, reference
from ._dispatch import register
from ._validate import check_device, check_float_tensor, check_int, check_kv_scale, is_fp8
from .pages import OutOfPages, PageAllocator
from .plan import PlanCapacity, TreePlan, plan_from_tree
from .tree import NodeTree

__all__ = ["TreeKVCache", "OutOfPages"]

# ---- registered ops: one launch each, dispatched like the attention ops -------------------------------


@register("kv_write", "cuda")
def _kv_write_cuda(slots, k, v, pool, layer):
    torch.ops.treeattn.kv_write_cuda(slots, k, v, pool, layer)


@register("kv_write", "triton")
def _kv_write_triton(slots, k, v, pool, layer):
    # pool: the stacked [C, num_layers, num_pages, page_size, ...] (C = 2 for K/V, 1 for MLA).
    _dispatch.triton_kernels.kv_write(slots, k, pool[0, layer], v, None if v is None else pool[1, layer])


@register("kv_write", "reference")
def _kv_write_reference(slots, k, v, pool, layer, k_scale=None, v_scale=None):
    keep = (slots >= 0) & (slots < pool.shape[2] * pool.shape[3])  # out-of-range slots are skipped, as in the kernels
    dst = slots[keep]
    for plane, rows, scale in ((0, k, k_scale), (1, v, v_scale)):
        if rows is not None:
            rows = rows[keep] if scale is None else reference.quantize(rows[keep], scale[layer], pool.dtype)
            pool[plane, layer].flatten(0, 1)[dst] = rows


# FP8 pools: the write quantizes (fp32 scales [num_layers, H]); no CUDA-extension kernel does that.
@register("kv_write_fp8", "triton")
def _kv_write_fp8_triton(slots, k, v, pool, layer, k_scale, v_scale):
    _dispatch.triton_kernels.kv_write(slots, k, pool[0, layer], v, None if v is None else pool[1, layer],
                                      k_scale=k_scale[layer], v_scale=None if v is None else v_scale[layer])


register("kv_write_fp8", "reference")(_kv_write_reference)


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
def _kv_write_run(
    slots: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], pool: torch.Tensor, layer: int,
    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> None:
    """``pool[0, layer]`` at flat ``slots`` = ``k`` (and ``pool[1, layer]`` = ``v`` for GQA). Slots outside
    ``[0, num_pages * page_size)`` are skipped: a negative slot is padding, and no slot writes outside the layer.
    An FP8 pool comes with fp32 ``k_scale`` (``v_scale``) ``[num_layers, H]``: the rows are quantized."""
    if k_scale is None:
        _dispatch.run("kv_write", slots.device, slots, k, v, pool, layer)
    else:
        _dispatch.run("kv_write_fp8", slots.device, slots, k, v, pool, layer, k_scale, v_scale)


@_kv_write_run.register_fake
def _(slots, k, v, pool, layer, k_scale=None, v_scale=None):
    return None


@torch.library.custom_op("treeattn::copy_pages_run", mutates_args=("pool",))
def _copy_pages_run(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, num_slots: torch.Tensor) -> None:
    """For every plane ``(c, layer)`` of the stacked pool: page ``dst[i]``'s first ``num_slots[i]`` slots =
    page ``src[i]``'s."""
    _dispatch.run("copy_pages", pool.device, pool, src, dst, num_slots)


@_copy_pages_run.register_fake
def _(pool, src, dst, num_slots):
    return None


# ---- argument checks ----------------------------------------------------------------------------------


def _resolve_device(device) -> torch.device:
    """``None``: the current CUDA device when CUDA is available, else the CPU. CUDA devices get their index."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return check_device(device)


class _KnownSlots:
    """The last slot tensors the cache made or already range-checked, so :meth:`TreeKVCache.write` does not
    check them again. A tensor counts as known while it is the same object at the same version (an in-place
    change of it, or of a view of it, bumps the version). Inference-mode tensors keep no version counter;
    they count as known by identity alone."""

    def __init__(self, size: int = 32):
        self._size = size
        self._entries: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()

    @staticmethod
    def _version(t: torch.Tensor) -> int:
        try:
            return t._version
        except RuntimeError:  # an inference tensor
            return -1

    def add(self, t: torch.Tensor) -> torch.Tensor:
        self._entries[id(t)] = (weakref.ref(t), self._version(t))
        self._entries.move_to_end(id(t))
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return t

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == self._version(t)


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
            for i in range(L):
                cache.write(i, slots, k_i, v_i)
                o = treeattn.tree_decode(q_i, *cache.layer(i), plan)
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
    ) -> "TreeKVCache":
        """MLA cache (absorbed form): one latent row ``c_kv (kv_lora_rank) ‖ k_pe (rope_dim)`` per token.
        ``layer(i)`` returns the ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]`` that
        ``treeattn.mla_tree_decode`` takes; ``write(layer, slots, kv)`` takes ``kv [n, kv_lora_rank + rope_dim]``.
        An FP8 ``dtype`` needs ``kv_scale``: a finite positive float or an fp32 tensor ``[]`` / ``[1]`` (every
        layer) or ``[num_layers]``; ``layer(i)`` then returns ``(kv_cache, kv_scale)``."""
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
        self._known_slots = _KnownSlots()

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
        """Slots handed to the caller: on the device, and known valid to :meth:`write`."""
        return self._known_slots.add(self._to_device(slots))

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
        growth = self.allocator.extend(branches, k, "append")  # raises before anything changed
        for n, pages in zip(nodes, growth.new_pages):
            self.tree.grow(n, pages, k)
        if growth.copy_src:
            torch.ops.treeattn.copy_pages_run(
                self._pool, *(self._to_device(np.asarray(x)) for x in (growth.copy_src, growth.copy_dst, growth.copy_slots))
            )
        return self._slots_out(np.array(self.tree.last_slots(nodes, k), dtype=np.int64))

    def release(self, node: int) -> None:
        """Release ``node``: it can no longer be used; every page nothing else references is freed. The tokens
        of a node with live descendants stay (their paths need them) until the last of those is released."""
        for pages, start in self.tree.release(self.tree.node(node, "release")):
            self.allocator.release(pages, start)

    # ---- slots and pools ----

    def slots(self, node: int) -> torch.Tensor:
        """int64 flat slots of the node's own tokens (path positions ``[start, end)``), on the cache's device."""
        return self._slots_out(self.tree.slots(self.tree.node(node, "slots")))

    def path_slots(self, node: int) -> torch.Tensor:
        """int64 flat slots of every token on the root→node path, in order, on the cache's device."""
        return self._slots_out(self.tree.path_slots(self.tree.node(node, "path_slots")))

    def length(self, node: int) -> int:
        """Tokens on the root→node path."""
        return self.tree.node(node, "length").end

    def parent(self, node: int) -> int | None:
        """The node's parent (None for a root). A released parent still answers here while it has children."""
        p = self.tree.node(node, "parent").parent
        return None if p is None else p.id

    def _check_layer(self, layer) -> int:
        return check_int("layer", layer, 0, self.num_layers - 1)

    def layer(self, i: int):
        """Layer ``i``'s pool views: ``(k_cache, v_cache)`` ``[num_pages, page_size, num_kv_heads, head_dim]``
        for GQA, ``kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]`` for MLA.

        FP8 pools also return the layer's scales, as the decode ops take them: ``(k_cache, v_cache, k_scale,
        v_scale)`` with fp32 ``[num_kv_heads]`` scales (``tree_decode(q, k, v, plan, k_scale=ks, v_scale=vs)``),
        and ``(kv_cache, kv_scale)`` with ``kv_scale [1]`` for MLA."""
        i = self._check_layer(i)
        caches = (self._pool[0, i],) if self.is_mla else (self._pool[0, i], self._pool[1, i])
        if self._scales is not None:
            caches += tuple(scale[i] for scale in self._scales)
        return caches[0] if len(caches) == 1 else caches

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """One launch scattering ``k, v [len(slots), num_kv_heads, head_dim]`` into layer ``layer`` at ``slots``
        (MLA: ``write(layer, slots, kv)`` with ``kv [len(slots), kv_lora_rank + rope_dim]``). A negative slot
        is skipped (padding); a slot ``>= num_pages * page_size`` is an error. Into an FP8 pool, 16/32-bit
        rows are quantized in the same launch: ``x / scale`` saturated to the format's range, rounded to
        nearest even (``treeattn.reference.quantize``).

        Slots this cache returned (``append``/``slots``/``path_slots``) are known to be in range and are not
        checked again, nor is a tensor already checked (until it changes in place). Other slots are checked
        on the host: on a GPU that costs one synchronisation the first time a tensor is seen. Under CUDA-graph
        capture and ``torch.compile`` there is no host check; the kernels skip out-of-range slots, so nothing
        is written outside the layer.
        """
        layer = self._check_layer(layer)
        self._check_slots(slots)
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
        scales = self._scales or ()
        k_scale = scales[0] if scales else None
        v_scale = scales[1] if len(scales) > 1 else None
        torch.ops.treeattn.kv_write_run(slots, k, v, self._pool, layer, k_scale, v_scale)

    def _check_slots(self, slots) -> None:
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            got = f"dtype {slots.dtype}, shape {list(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"slots: expected a 1-D torch.int64 tensor (from append/slots), got {got}")
        if slots.device != self.device:
            raise ValueError(f"slots: expected device {self.device} (the cache's), got {slots.device}")
        if slots.shape[0] > 1 and slots.stride(0) != 1:
            raise ValueError(f"slots: expected a contiguous tensor, got stride {slots.stride(0)}")
        if torch.compiler.is_compiling() or slots in self._known_slots:
            return
        if slots.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no host check can see the values a replay will use; the kernels bound them
        if slots.shape[0]:
            top = int(slots.max())
            if top >= self.num_pages * self.page_size:
                raise ValueError(
                    f"slots: expected values < {self.num_pages * self.page_size} (num_pages * page_size; a negative "
                    f"slot is skipped), got {top}"
                )
        self._known_slots.add(slots)

    def _check_rows(self, name: str, t, n: int) -> None:
        shape = (n, *self._row_shape)
        check_float_tensor(name, t, len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)} ([len(slots), ...] of the cache), got {list(t.shape)}")
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
        """
        node_list = self.tree.nodes(nodes, "plan")
        k = check_int("num_tokens", num_tokens, 1)
        if k > 1:  # (one query over an empty path is fine: empty KV, output 0)
            for n in node_list:
                if n.end < k:
                    raise ValueError(f"plan: node {n.id} has {n.end} tokens on its path, fewer than num_tokens={k}")
        walk = self.tree.plan_walk(node_list, k)
        return plan_from_tree(
            parent=walk.parent, start=walk.start, end=walk.end, pages=walk.pages,
            query_owner=walk.query_owner, query_end=walk.query_end, page_size=self.page_size,
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
            f"num_pages={self.num_pages}, pages_free={self.allocator.num_free}, dtype={self.dtype}, device={self.device})"
        )
