"""Planner: finds the KV pages that queries share and turns the step into work items (DESIGN §3.1).

A decode step's paged table (CSR: ``kv_indptr``, ``kv_indices``, ``kv_last_page_len``) is read on the host
once per step. Queries are sorted by their page lists; the longest common prefixes (LCP) of neighbours give
the prefix trie as LCP intervals, each trie edge a page run shared by an exact, contiguous (in sorted order)
set of queries. Every edge is cut into chunks and its queries into blocks; a **work item** is one
(chunk, query block) pair that the stage-1 kernel reads once for all the block's queries. A query covered by
one item gets its output written directly; the others get fp32 partial states that stage 2 merges in
root→leaf order (deterministic: no atomics, fixed order).

The trie key of a page slot is (page id, tokens used), so two queries only share a page whose token range
they both attend in full; sharing is found, never assumed, and any valid table gives exact attention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ._plan_numpy import (
    _MIN_CHUNK_TOKENS,
    _PROGRAMS_PER_SM,
    _TARGET_ROWS_PER_ITEM,
    _TOKENS_PER_PARTIAL_ROW,
    _next_pow2,
    _plan_table_numpy,
    _plan_tree_numpy,
    _sizing,
)
from ._validate import check_index_tensor

try:  # the C++ planner (csrc/planner.cpp); _plan_numpy is its fallback and its oracle
    from . import _planner
except ImportError:
    _planner = None
# TREEATTN_PLANNER=numpy forces the numpy planner (tests compare the two).
_PLANNER = os.environ.get("TREEATTN_PLANNER", "auto")

__all__ = ["TreePlan", "PlanCapacity", "plan", "plan_from_tree", "PLAN_TENSOR_FIELDS", "PlanArgs"]

PLAN_TENSOR_FIELDS = (
    "kv_indptr", "kv_indices", "kv_last_page_len",
    "item_page_ptr", "item_num_tokens", "item_row_ptr", "row_query", "row_dest", "merge_query", "merge_ptr",
)


class PlanArgs:
    """The plan as registered ops see it: its tensors (by field name) plus the ints kernels specialise on."""

    def __init__(self, tensors, page_size: int, max_queries_per_item: int):
        for name, t in zip(PLAN_TENSOR_FIELDS, tensors):
            setattr(self, name, t)
        self.page_size = page_size
        self.max_queries_per_item = max_queries_per_item

@dataclass(frozen=True)
class PlanCapacity:
    """Fixed sizes of a plan's device buffers, so that later steps can be re-planned into the same memory
    (:meth:`TreePlan.update_`) and a CUDA graph captured once replays every step. Padding items read
    nothing and padding merge entries write nothing.

    Example:
        >>> cap = treeattn.PlanCapacity.of(first_plan, headroom=2.0)
        >>> plan = treeattn.plan(indptr, indices, last_len, page_size=16, capacity=cap)
    """

    items: int
    rows: int
    partial_rows: int
    merge_queries: int
    nnz: int

    @classmethod
    def of(cls, plan: "TreePlan", headroom: float = 1.0) -> "PlanCapacity":
        """Capacity of ``plan``'s actual sizes times ``headroom``."""
        s = plan.stats
        sizes = (s["work_items"], s["rows"], s["partial_rows"], s["merge_queries"], s["nnz"])
        return cls(*(max(1, int(np.ceil(v * headroom))) for v in sizes))

    def piece_sizes(self) -> list[int]:
        """Sizes of the packed pieces, in :data:`_PIECES` order."""
        return [self.items, self.items, self.items + 1, self.rows, self.rows, self.merge_queries, self.merge_queries + 1]


# Packed buffer pieces, and the value that pads each (padding items read nothing, padding rows write
# nothing, a padding merge entry has query -1 and no rows).
_PIECES = ("item_page_ptr", "item_num_tokens", "item_row_ptr", "row_query", "row_dest", "merge_query", "merge_ptr")
_PAD = {"item_page_ptr": 0, "item_num_tokens": 0, "item_row_ptr": "last", "row_query": 0, "row_dest": -1,
        "merge_query": -1, "merge_ptr": "last"}


@dataclass(eq=False)
class TreePlan:
    """What one decode step reads and merges. Built by :func:`plan`; reused by every layer.

    Device tensors (int32), all views into one buffer copied to the device once:
        item_page_ptr ``[num_items]``: offset into ``kv_indices`` of the item's first page.
        item_num_tokens ``[num_items]``: KV tokens the item reads (all its pages full but possibly the last).
        item_row_ptr ``[num_items + 1]``: the item's rows in ``row_query``/``row_dest``.
        row_query ``[num_rows]``: query id of each (item, query) row.
        row_dest ``[num_rows]``: partial-state row that the row writes, or -1 to write the output directly.
        merge_query ``[num_merge]``: queries stage 2 produces (several partials, or empty KV).
        merge_ptr ``[num_merge + 1]``: each merge query's partial rows, contiguous and in root→leaf order.
    """

    num_queries: int
    page_size: int
    device: torch.device
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    item_page_ptr: torch.Tensor
    item_num_tokens: torch.Tensor
    item_row_ptr: torch.Tensor
    row_query: torch.Tensor
    row_dest: torch.Tensor
    merge_query: torch.Tensor
    merge_ptr: torch.Tensor
    num_items: int
    num_partial_rows: int
    max_queries_per_item: int
    max_item_tokens: int
    max_page_id: int
    stats: dict = field(default_factory=dict)
    capacity: PlanCapacity | None = None
    _buffer: torch.Tensor | None = field(default=None, repr=False)
    _replan: dict = field(default_factory=dict, repr=False)
    _workspaces: dict = field(default_factory=dict, repr=False)

    @property
    def num_merge_queries(self) -> int:
        return self.merge_query.shape[0]

    def tensor_args(self) -> list[torch.Tensor]:
        """The plan's device tensors in :data:`PLAN_TENSOR_FIELDS` order (what the registered ops take)."""
        return [getattr(self, name) for name in PLAN_TENSOR_FIELDS]

    def workspace(self, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 partial states ``([P, num_heads, head_dim], [P, num_heads])`` for stage 1/2, allocated on the
        first layer and reused by every later layer of the step (no per-layer allocation)."""
        key = (num_heads, head_dim)
        if key not in self._workspaces:
            rows = self.num_partial_rows
            self._workspaces[key] = (
                torch.empty(rows, num_heads, head_dim, dtype=torch.float32, device=self.device),
                torch.empty(rows, num_heads, dtype=torch.float32, device=self.device),
            )
        return self._workspaces[key]

    def update_(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor) -> "TreePlan":
        """Re-plan a new step's table into this plan's buffers, in place (CUDA-graph replay over trees that
        change every step). Needs a plan built with ``capacity=``, the same number of queries and a step
        that fits the capacity; copies to the device without a host sync.

        Example:
            >>> plan = treeattn.plan(..., capacity=cap); graph captured over tree_decode(q, k, v, plan, out=o)
            >>> plan.update_(next_indptr, next_indices, next_last_len); graph.replay()
        """
        if self.capacity is None:
            raise ValueError("plan: expected a plan built with capacity=PlanCapacity(...) for update_, got capacity=None")
        check_index_tensor("kv_indptr", kv_indptr)
        check_index_tensor("kv_indices", kv_indices)
        check_index_tensor("kv_last_page_len", kv_last_page_len)
        if not self._replan:
            raise ValueError("plan: expected a plan made by treeattn.plan(...) for update_; refill a "
                             "TreeKVCache plan with cache.plan(nodes, into=plan)")
        arrays = _run_planner(kv_indptr, kv_indices, kv_last_page_len, **self._replan)
        return self._fill_(arrays, kv_indptr, kv_indices, kv_last_page_len)

    def _fill_(self, arrays, kv_indptr, kv_indices, kv_last_page_len) -> "TreePlan":
        """Writes a new step's plan arrays and table into this fixed-capacity plan's buffers (no host sync).
        Raises, leaving the plan unchanged, when the step does not fit."""
        if self.capacity is None:
            raise ValueError("plan: expected a plan built with capacity=PlanCapacity(...) to refill, got capacity=None")
        if kv_last_page_len.shape[0] != self.num_queries:
            raise ValueError(
                f"kv_last_page_len: expected {self.num_queries} queries (the captured plan's), got {kv_last_page_len.shape[0]}"
            )
        packed, sizes, stats, max_item_tokens, max_page_id = arrays
        stats = _with_sizes(stats, sizes, kv_indices)
        padded = _pad_to_capacity((packed, sizes, stats, None, None), self.capacity)
        nnz = kv_indices.shape[0]
        self._buffer.copy_(_staged(torch.from_numpy(padded), self.device), non_blocking=True)
        self.kv_indptr.copy_(kv_indptr, non_blocking=True)
        self.kv_indices[:nnz].copy_(kv_indices, non_blocking=True)
        self.kv_last_page_len.copy_(kv_last_page_len, non_blocking=True)
        self.stats, self.max_item_tokens, self.max_page_id = stats, max_item_tokens, max_page_id
        return self

    def __repr__(self) -> str:
        return f"TreePlan(num_queries={self.num_queries}, page_size={self.page_size}, stats={self.stats})"


def plan(
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    *,
    page_size: int,
    num_qo_heads: int | None = None,
    num_kv_heads: int | None = None,
    num_pages: int | None = None,
    device: torch.device | str | None = None,
    num_sms: int = 132,
    share_prefixes: bool = True,
    capacity: PlanCapacity | None = None,
) -> TreePlan:
    """Plan one decode step over a paged KV table; reuse the plan in every layer.

    Args:
        kv_indptr: int32 ``[num_queries + 1]``, non-decreasing, ``kv_indptr[0] == 0``, ``kv_indptr[-1] == nnz``.
        kv_indices: int32 ``[nnz]`` page ids; query ``i`` reads pages ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``.
        kv_last_page_len: int32 ``[num_queries]``: tokens in each query's last page, ``1..page_size``
            (ignored for a query with no pages).
        page_size: tokens per page.
        num_qo_heads, num_kv_heads: optional hints that size query blocks (rows = queries x group);
            for MLA pass ``num_kv_heads=1``. Any plan is exact for any head counts.
        num_pages: optional pool size; page ids must then be ``< num_pages``.
        device: where the plan's tensors live (default: ``kv_indices.device``).
        num_sms: streaming multiprocessors to fill (split-KV parallelism).
        share_prefixes: False plans every query on its own (plain split-KV decode through the same
            kernels): the per-branch baseline the benchmarks compare against.
        capacity: fixed buffer sizes (:class:`PlanCapacity`) so that later steps can be re-planned in place
            with :meth:`TreePlan.update_` under a captured CUDA graph; raises if this step does not fit.

    Returns:
        A :class:`TreePlan`; ``plan.stats`` holds ``unique_tokens`` (distinct KV tokens attended),
        ``naive_tokens`` (sum of the queries' KV lengths), ``planned_tokens`` (tokens stage 1 reads per KV
        head), ``work_items`` and more. May synchronise with the device (copies the table to the host).

    Example:
        >>> p = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=16)
        >>> p.stats["unique_tokens"], p.stats["naive_tokens"]
    """
    check_index_tensor("kv_indptr", kv_indptr)
    check_index_tensor("kv_indices", kv_indices)
    check_index_tensor("kv_last_page_len", kv_last_page_len)
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
    num_queries = kv_last_page_len.shape[0]
    if kv_indptr.shape[0] != num_queries + 1:
        raise ValueError(
            f"kv_indptr: expected shape [{num_queries + 1}] (len(kv_last_page_len) + 1), "
            f"got {list(kv_indptr.shape)}"
        )
    if device is None:
        device = kv_indices.device
    device = torch.device(device)

    replan = dict(page_size=page_size, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, num_pages=num_pages,
                  num_sms=num_sms, share_prefixes=share_prefixes)
    arrays = _run_planner(kv_indptr, kv_indices, kv_last_page_len, **replan)
    group = _sizing(num_qo_heads, num_kv_heads)[0]
    return _assemble(arrays, kv_indptr, kv_indices, kv_last_page_len, page_size, device, capacity, group, replan)


def _run_planner(kv_indptr, kv_indices, kv_last_page_len, *, page_size, num_qo_heads, num_kv_heads, num_pages,
                 num_sms, share_prefixes):
    group, kv_heads = _sizing(num_qo_heads, num_kv_heads)
    tables = (kv_indptr.cpu().numpy(), kv_indices.cpu().numpy(), kv_last_page_len.cpu().numpy())
    planner = _plan_table_cpp if _planner is not None and _PLANNER != "numpy" else _plan_table_numpy
    return planner(*tables, page_size, -1 if num_pages is None else num_pages, share_prefixes, group, kv_heads, num_sms)


def _with_sizes(stats: dict, sizes, kv_indices: torch.Tensor) -> dict:
    """Adds the buffer sizes a :class:`PlanCapacity` bounds to the stats."""
    return {**stats, "rows": int(sizes[3]), "merge_queries": int(sizes[5]), "nnz": int(kv_indices.shape[0])}


def _plan_table_cpp(indptr, indices, last_len, page_size, num_pages, share_prefixes, group, kv_heads, num_sms):
    """The C++ planner (``treeattn._planner``): same arrays as :func:`_plan_table_numpy`, ~20x faster."""
    return _planner.plan_table(
        indptr, indices, last_len, page_size, num_pages, share_prefixes, group, kv_heads, num_sms,
        _TARGET_ROWS_PER_ITEM, _TOKENS_PER_PARTIAL_ROW, _MIN_CHUNK_TOKENS, _PROGRAMS_PER_SM,
    )


def plan_from_tree(
    *,
    parent,
    start,
    end,
    pages,
    query_owner,
    query_end,
    page_size: int,
    num_qo_heads: int | None,
    num_kv_heads: int | None,
    device: torch.device,
    num_sms: int = 132,
    capacity: PlanCapacity | None = None,
    into: TreePlan | None = None,
) -> TreePlan:
    """Plan a step over a tree whose sharing is known (``TreeKVCache.plan``): the prefix-trie edges come from
    the tree instead of from comparing page lists, and the paged table is written from the nodes' page lists.

    Nodes form a forest given as sequences of one entry per node: ``parent[i]`` is -1 for a root, else its
    parent's index; siblings (and roots) are planned in index order. Node ``i`` holds path positions
    ``[start[i], end[i])`` (a root starts at 0, a child where its parent ends) in ``pages[i]``, an int32 buffer
    (``array('i')`` or numpy) of the page ids at page indices ``start[i] // page_size ..
    ceil(end[i] / page_size) - 1`` (empty when the node holds no tokens); a path's page at an index is that of
    the deepest node covering it. Query ``q`` attends path positions ``[0, query_end[q])`` of node
    ``query_owner[q]``, the node on its path that holds its last position (``start < query_end <= end``), or
    is empty (``query_owner[q] == -1``, ``query_end[q] == 0``). A page id belongs to one node, except that a
    node starting mid-page may continue in place in the page its parent's path ends in (TreeKVCache's copy on
    write): the C++ planner counts ``unique_tokens`` on that basis, from the nodes rather than the table.
    The plan shares exactly what :func:`plan` finds on the same table (same stats); bad input raises
    ``ValueError``.
    """
    group, kv_heads = _sizing(num_qo_heads, num_kv_heads)
    tree = (parent, start, end, pages, query_owner, query_end, page_size)
    if _planner is not None and _PLANNER != "numpy":
        result = _planner.plan_tree(
            *tree, group, kv_heads, num_sms,
            _TARGET_ROWS_PER_ITEM, _TOKENS_PER_PARTIAL_ROW, _MIN_CHUNK_TOKENS, _PROGRAMS_PER_SM,
        )
    else:
        result = _plan_tree_numpy(*tree, group, kv_heads, num_sms)
    arrays, table = result[:5], [torch.from_numpy(a) for a in result[5:]]
    if into is not None:  # refill a fixed-capacity plan (CUDA-graph replay over changing trees)
        return into._fill_(arrays, *table)
    return _assemble(arrays, *table, page_size, device, capacity, group)


def _staged(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ready for a non-blocking copy to ``device`` (pinned when the device is a GPU)."""
    return host.pin_memory() if device.type == "cuda" else host


def _pad_to_capacity(arrays, capacity: PlanCapacity) -> np.ndarray:
    """Plan arrays laid out in ``capacity``'s fixed piece sizes; raises if the step does not fit."""
    packed, sizes, stats, _, _ = arrays
    limits = {"items": (stats["work_items"], capacity.items), "rows": (stats["rows"], capacity.rows),
              "partial_rows": (stats["partial_rows"], capacity.partial_rows),
              "merge_queries": (stats["merge_queries"], capacity.merge_queries), "nnz": (stats["nnz"], capacity.nnz)}
    for name, (used, limit) in limits.items():
        if used > limit:
            raise ValueError(f"capacity: expected this step's {name} <= capacity.{name}={limit}, got {used}")
    out = []
    for name, piece, size in zip(_PIECES, np.split(packed, np.cumsum(sizes)[:-1]), capacity.piece_sizes()):
        pad = _PAD[name]
        fill = (piece[-1] if piece.size else 0) if pad == "last" else pad
        out.append(np.concatenate([piece, np.full(size - piece.shape[0], fill, dtype=np.int32)]))
    return np.concatenate(out)


def _assemble(arrays, kv_indptr, kv_indices, kv_last_page_len, page_size: int, device: torch.device,
              capacity: PlanCapacity | None = None, group: int = 4, replan: dict | None = None) -> TreePlan:
    """Plan arrays -> TreePlan: one host-to-device copy of the packed buffer, then views. With a capacity the
    pieces are padded to fixed sizes and the plan owns copies of the table (so update_ can refill them)."""
    packed, sizes, stats, max_item_tokens, max_page_id = arrays
    stats = _with_sizes(stats, sizes, kv_indices)
    block_queries = stats["max_queries_per_item"]
    if capacity is not None:
        packed, sizes = _pad_to_capacity((packed, sizes, stats, None, None), capacity), capacity.piece_sizes()
        # Under a capacity the kernels' query block is fixed at the largest any step can need.
        block_queries = max(1, _TARGET_ROWS_PER_ITEM // _next_pow2(group))
        indices = torch.zeros(capacity.nnz, dtype=torch.int32, device=device)
        indices[: kv_indices.shape[0]].copy_(kv_indices)
        kv_indptr, kv_indices, kv_last_page_len = kv_indptr.to(device, copy=True), indices, kv_last_page_len.to(device, copy=True)
    buffer = _staged(torch.from_numpy(packed), device).to(device, non_blocking=True)
    views = torch.split(buffer, list(sizes))
    return TreePlan(
        num_queries=stats["num_queries"],
        page_size=page_size,
        device=device,
        kv_indptr=kv_indptr.to(device),
        kv_indices=kv_indices.to(device),
        kv_last_page_len=kv_last_page_len.to(device),
        **dict(zip(_PIECES, views)),
        num_items=views[0].shape[0],
        num_partial_rows=stats["partial_rows"] if capacity is None else capacity.partial_rows,
        max_queries_per_item=block_queries,
        max_item_tokens=max_item_tokens,
        max_page_id=max_page_id,
        stats=stats,
        capacity=capacity,
        _buffer=buffer,
        _replan=replan or {},
    )

