"""Planner: finds the KV pages that queries share and turns the step into work items.

A decode step's paged table (CSR: ``kv_indptr``, ``kv_indices``, ``kv_last_page_len``) is read on the host
once per step by the C++ planner (``treeattn._planner``). Queries are sorted by their page lists; the longest
common prefixes (LCP) of neighbours give the prefix trie as LCP intervals, each trie edge a page run shared
by an exact, contiguous (in sorted order) set of queries. Every edge is cut into chunks and its queries into
blocks; a **work item** is one (chunk, query block) pair that the stage-1 kernel reads once for all the
block's queries. A query covered by one item gets its output written directly; the others get fp32 partial
states that stage 2 merges in root→leaf order (deterministic: no atomics, fixed order).

The trie key of a page slot is (page id, tokens used), so two queries only share a page whose token range
they both attend in full; sharing is found, never assumed, and any valid table gives exact attention.

The planner returns one int32 buffer holding the plan's own copy of the table and its work arrays; the
layout (pieces, order, padding) and the sizing policy live in the C++ module only (``_planner.PIECES``,
``_planner.SIZING``). A plan never refers to the caller's tensors: changing them after planning changes
nothing.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import _planner
from ._validate import check_device, check_index_tensor, check_int

__all__ = ["TreePlan", "PlanCapacity", "plan", "plan_from_tree", "LastTreePlan", "PLAN_TENSOR_FIELDS", "PlanArgs",
           "plan_of"]

# The plan's int32 tensors, in the planner's buffer order (what the registered ops take).
PLAN_TENSOR_FIELDS: tuple[str, ...] = tuple(_planner.PIECES)

_INT32_MAX = 2**31 - 1


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
    (:meth:`TreePlan.update_`, ``TreeKVCache.plan(..., into=)``) and a CUDA graph captured once replays every
    step. Padding items read nothing and padding merge entries write nothing.

    Example:
        >>> cap = treeattn.PlanCapacity.of(first_plan, headroom=2.0)
        >>> plan = treeattn.plan(indptr, indices, last_len, page_size=16, capacity=cap)
    """

    items: int
    rows: int
    partial_rows: int
    merge_queries: int
    nnz: int

    def __post_init__(self):
        for name in ("items", "rows", "partial_rows", "merge_queries", "nnz"):
            object.__setattr__(self, name, check_int(f"capacity.{name}", getattr(self, name), 1, _INT32_MAX - 1))

    @classmethod
    def of(cls, plan: TreePlan, headroom: float = 1.0) -> PlanCapacity:
        """Capacity of ``plan``'s actual sizes times ``headroom``."""
        s = plan.stats
        sizes = (s["work_items"], s["rows"], s["partial_rows"], s["merge_queries"], s["nnz"])
        return cls(*(max(1, int(np.ceil(v * headroom))) for v in sizes))


class TreePlan:
    """What one decode step reads and merges. Built by :func:`plan`; reused by every layer.

    Device tensors (int32), all views into one buffer copied to the device once (the plan's own copy of the
    table included), in :data:`PLAN_TENSOR_FIELDS` order:
        kv_indptr ``[num_queries + 1]``, kv_indices ``[nnz]``, kv_last_page_len ``[num_queries]``: the table.
        item_page_ptr ``[num_items]``: offset into ``kv_indices`` of the item's first page.
        item_num_tokens ``[num_items]``: KV tokens the item reads (all its pages full but possibly the last).
        item_row_ptr ``[num_items + 1]``: the item's rows in ``row_query``/``row_dest``.
        row_query ``[num_rows]``: query id of each (item, query) row.
        row_dest ``[num_rows]``: partial-state row that the row writes, or -1 to write the output directly.
        merge_query ``[num_merge]``: queries stage 2 produces (several partials, or empty KV).
        merge_ptr ``[num_merge + 1]``: each merge query's partial rows, contiguous and in root→leaf order.

    Ints: ``num_queries``, ``page_size``, ``num_items``, ``num_partial_rows`` (rows of the fp32 workspace),
    ``max_queries_per_item`` (the kernels' query block: no item holds more queries), ``max_item_tokens``,
    ``max_page_id`` (-1 without pages); ``device``; ``stats``; ``capacity`` (None unless fixed-capacity).

    ``prepared``: the decode ops' launches prepared for this plan, keyed by argument layout (filled by
    ``treeattn.decode`` on a layout's first call; they refer to the plan's buffers, so they live and die with
    it, and stay valid across :meth:`update_`).
    """

    def __init__(self, result: dict, page_size: int, device: torch.device, capacity: PlanCapacity | None,
                 options=None):
        """From a ``_planner`` result: one host-to-device copy of the packed buffer, then views."""
        stats = result["stats"]
        self._buffer = _staged(torch.from_numpy(result["packed"]), device).to(device, non_blocking=True)
        for name, view in zip(PLAN_TENSOR_FIELDS, self._buffer.split_with_sizes(result["piece_sizes"])):
            setattr(self, name, view)
        self.num_queries = stats["num_queries"]
        self.page_size = page_size
        self.device = device
        self.capacity = capacity
        self.num_items = self.item_page_ptr.shape[0]
        self.num_partial_rows = stats["partial_rows"] if capacity is None else capacity.partial_rows
        self.max_queries_per_item = result["max_queries_per_item"]
        self.max_item_tokens = result["max_item_tokens"]
        self.max_page_id = result["max_page_id"]
        self.stats = stats
        self._options = options  # how treeattn.plan made it (update_ re-plans with them); None for tree plans
        self._fills = 0  # refills so far (LastTreePlan tells a plan it patched from one refilled since)
        self._workspaces: dict = {}
        self.prepared: dict = {}
        _live_plans[(self._buffer.device, self._buffer.data_ptr())] = self

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

    def update_(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor) -> TreePlan:
        """Re-plan a new step's table into this plan's buffers, in place (CUDA-graph replay over trees that
        change every step). Needs a plan built by :func:`plan` with ``capacity=``, the same number of queries
        and a step that fits the capacity (else ValueError, the plan unchanged); copies to the device without
        a host sync. The new step is planned with this plan's page size, hints and query block.

        Example:
            >>> plan = treeattn.plan(..., capacity=cap); graph captured over tree_decode(q, k, v, plan, out=o)
            >>> plan.update_(next_indptr, next_indices, next_last_len); graph.replay()
        """
        self._check_refillable()
        if self._options is None:
            raise ValueError("plan: expected a plan made by treeattn.plan(...) for update_; refill a "
                             "TreeKVCache plan with cache.plan(nodes, into=plan)")
        tables = _host_table(kv_indptr, kv_indices, kv_last_page_len)
        self._check_num_queries("kv_last_page_len", kv_last_page_len.shape[0])
        return self._fill_(_planner.plan_table(*tables, self._options))

    def _check_refillable(self) -> None:
        if self.capacity is None:
            raise ValueError("plan: expected a plan built with capacity=PlanCapacity(...) to refill (update_ or "
                             "into=), got capacity=None")

    def _check_num_queries(self, name: str, num_queries: int) -> None:
        if num_queries != self.num_queries:
            raise ValueError(f"{name}: expected {self.num_queries} queries (the captured plan's), got {num_queries}")

    def _fill_(self, result: dict) -> TreePlan:
        """Copies a planner result made with this plan's capacity into its buffers (no host sync)."""
        if result["max_queries_per_item"] > self.max_queries_per_item:  # (the planner caps it; never taken)
            raise ValueError(f"plan: expected items of <= {self.max_queries_per_item} queries, got "
                             f"{result['max_queries_per_item']}")
        self._buffer.copy_(_staged(torch.from_numpy(result["packed"]), self.device), non_blocking=True)
        return self._refilled(result)

    def _refilled(self, result: dict) -> TreePlan:
        """Takes the ints and stats of ``result``, whose buffer is now this plan's."""
        self.stats = result["stats"]
        self.max_item_tokens, self.max_page_id = result["max_item_tokens"], result["max_page_id"]
        self._fills += 1
        return self

    def __repr__(self) -> str:
        return f"TreePlan(num_queries={self.num_queries}, page_size={self.page_size}, stats={self.stats})"


# Live plans by their buffer's address: a registered op receives the plan's tensors, not the plan, and finds
# the plan (and its prepared launches) again through them. Weak values: an entry goes with its plan.
_live_plans: weakref.WeakValueDictionary[tuple, TreePlan] = weakref.WeakValueDictionary()


def plan_of(tensors) -> TreePlan | None:
    """The live plan whose device tensors (:meth:`TreePlan.tensor_args`) these are, or None (copies of them,
    or tensors of no plan)."""
    first, last = tensors[0], tensors[-1]
    found = _live_plans.get((first.device, first.data_ptr()))
    if found is None or len(tensors) != len(PLAN_TENSOR_FIELDS) or found.merge_ptr.data_ptr() != last.data_ptr():
        return None
    return found


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
    num_sms: int | None = None,
    share_prefixes: bool = True,
    capacity: PlanCapacity | None = None,
) -> TreePlan:
    """Plan one decode step over a paged KV table; reuse the plan in every layer.

    Args:
        kv_indptr: int32 ``[num_queries + 1]``, non-decreasing, ``kv_indptr[0] == 0``, ``kv_indptr[-1] == nnz``.
        kv_indices: int32 ``[nnz]`` page ids; query ``i`` reads pages ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``.
        kv_last_page_len: int32 ``[num_queries]``: tokens in each query's last page, ``1..page_size``
            (ignored for a query with no pages).
        page_size: tokens per page (an int or numpy integer, not a bool), ``1..2**31 - 1``.
        num_qo_heads, num_kv_heads: optional hints that size query blocks (rows = queries x group);
            for MLA pass ``num_kv_heads=1``. Any plan is exact for any head counts.
        num_pages: optional pool size (``>= 0``); page ids must then be ``< num_pages``.
        device: where the plan's tensors live, a CPU or CUDA device present here (default:
            ``kv_indices.device``).
        num_sms: streaming multiprocessors to fill (split-KV parallelism); default: the CUDA device's
            count, 132 (an H100/H200) for other devices.
        share_prefixes: False plans every query on its own (plain split-KV decode through the same
            kernels): the per-branch baseline the benchmarks compare against.
        capacity: fixed buffer sizes (:class:`PlanCapacity`) so that later steps can be re-planned in place
            with :meth:`TreePlan.update_` under a captured CUDA graph; raises if this step does not fit.

    The table tensors may be strided views on any device; the plan keeps its own contiguous copy of what it
    validated, so later changes to the caller's tensors do not affect it.

    Returns:
        A :class:`TreePlan`; ``plan.stats`` holds ``unique_tokens`` (distinct KV tokens attended),
        ``naive_tokens`` (sum of the queries' KV lengths), ``planned_tokens`` (tokens stage 1 reads per KV
        head), ``work_items`` and more. May synchronise with the device (copies the table to the host).

    Example:
        >>> p = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=16)
        >>> p.stats["unique_tokens"], p.stats["naive_tokens"]
    """
    tables = _host_table(kv_indptr, kv_indices, kv_last_page_len)
    device = check_device(kv_indices.device if device is None else device)
    options = _planner.Options(
        page_size=check_int("page_size", page_size, 1, _INT32_MAX),
        num_pages=None if num_pages is None else check_int("num_pages", num_pages, 0, 2**31),
        share_prefixes=_check_bool("share_prefixes", share_prefixes),
        **_hints(num_qo_heads, num_kv_heads, num_sms, device),
        capacity=_check_capacity(capacity),
    )
    return TreePlan(_planner.plan_table(*tables, options), options.page_size, device, capacity, options)


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
    num_sms: int | None = None,
    capacity: PlanCapacity | None = None,
    into: TreePlan | None = None,
    last: LastTreePlan | None = None,
) -> TreePlan:
    """Plan a step over a tree whose sharing is known (``TreeKVCache.plan``): the prefix-trie edges come from
    the tree instead of from comparing page lists, and the paged table is written from the nodes' page lists.

    Nodes form a forest given as sequences of one entry per node: ``parent[i]`` is -1 for a root, else its
    parent's index; siblings (and roots) are planned in index order. Node ``i`` holds path positions
    ``[start[i], end[i])`` (a root starts at 0, a child where its parent ends) in ``pages[i]``, a contiguous
    int32 buffer (``array('i')`` or numpy) of the page ids at page indices ``start[i] // page_size ..
    ceil(end[i] / page_size) - 1`` (empty when the node holds no tokens); a path's page at an index is that of
    the deepest node covering it. Query ``q`` attends path positions ``[0, query_end[q])`` of node
    ``query_owner[q]``, the node on its path that holds its last position (``start < query_end <= end``), or
    is empty (``query_owner[q] == -1``, ``query_end[q] == 0``); every node has a query at or below it. A page
    id belongs to one node, except that a node starting mid-page may continue in place in the page its
    parent's path ends in (TreeKVCache's copy on write): ``unique_tokens`` is counted on that basis, from the
    nodes rather than the table. The plan shares exactly what :func:`plan` finds on the same table (same
    stats); bad input raises ``ValueError`` or ``TypeError``.

    ``into``: a fixed-capacity plan (made with ``capacity=``, same page size, device and number of queries) to
    refill in place instead of making a new plan; the hints then only size blocks up to its query block.

    ``last``: keeps this plan there, so that the next step's plan can be patched from it
    (:meth:`LastTreePlan.patched`).
    """
    page_size = check_int("page_size", page_size, 1, _INT32_MAX)
    hints = _hints(num_qo_heads, num_kv_heads, num_sms, device)
    if into is not None:
        _check_into(into, page_size, device, len(query_end))
        capacity, device = into.capacity, into.device
        hints["max_queries_per_item"] = into.max_queries_per_item
    options = _planner.Options(page_size=page_size, **hints, capacity=_check_capacity(capacity))
    result = _planner.plan_tree(parent, start, end, pages if isinstance(pages, list) else list(pages),
                                query_owner, query_end, options, keep_growth=last is not None)
    made = into._fill_(result) if into is not None else TreePlan(result, page_size, _check_device(device), capacity)
    if last is not None:
        last._keep(result, made)
    return made


class LastTreePlan:
    """The last plan made from a tree (:func:`plan_from_tree` with ``last=``), kept so that the next step's plan,
    when only lengths changed, is this one's buffer patched (``_planner.patch_growth``: a copy and a few writes)
    instead of a walk and a new plan: the common decode step, where every query grew inside its last page and
    left it partial (14 of 16 steps at page size 16). Which steps those are, the planner decides
    (:meth:`patched` returns None for any other), given that the caller asks only when nothing but growth inside
    the nodes' pages happened since (the same nodes, parents, starts, page lists and query owners, and the same
    planning options).

    A plan handed out never changes under its holder: a new plan gets a patched copy. Only ``into=`` the last
    plan itself (the documented in-place refill) is patched in place, and only while nothing else refilled it.
    """

    __slots__ = ("_growth", "_host", "_meta", "_plan", "_fills")

    def __init__(self):
        self._growth = None

    def forget(self) -> None:
        self._growth = self._host = self._meta = self._plan = None

    def _keep(self, result: dict, plan: TreePlan) -> None:
        # The plan's buffer as host memory: the plan's own on the CPU (never written here, only copied; into= the
        # plan itself excepted), the planner's private array for a device plan (the plan holds a device copy).
        self._host = plan._buffer.numpy() if plan.device.type == "cpu" else result["packed"]
        self._growth = result["growth"]
        self._meta = {k: result[k] for k in ("piece_sizes", "max_queries_per_item", "max_page_id")}
        self._meta.update(stats=dict(result["stats"]), page_size=plan.page_size, device=plan.device,
                          capacity=plan.capacity)
        self._plan = weakref.ref(plan)
        self._fills = plan._fills

    def patched(self, query_end: list[int], into: TreePlan | None) -> TreePlan | None:
        """The plan of the kept plan's tree whose queries now end at ``query_end``, patched from it; None when
        that plan is more than a change of lengths (or the kept plan's buffer was refilled since, or ``into`` is
        another plan than the kept one): the caller then plans in full."""
        if self._growth is None:
            return None
        kept = self._plan()
        if (kept is not None and kept._fills != self._fills) or (into is not None and into is not kept):
            return None
        meta = self._meta
        on_cpu = meta["device"].type == "cpu"
        # A device plan's host array is private: patched in place. A CPU plan's is the plan's buffer (or a view of
        # it someone still holds): copied, but for into= the plan itself.
        got = _planner.patch_growth(self._growth, self._host, query_end, copy=on_cpu and into is None)
        if got is None:
            return None
        planned, unique, naive, max_item_tokens, packed = got
        stats = dict(meta["stats"], planned_tokens=planned, unique_tokens=unique, naive_tokens=naive)
        result = {"packed": packed, "piece_sizes": meta["piece_sizes"], "stats": stats,
                  "max_queries_per_item": meta["max_queries_per_item"], "max_page_id": meta["max_page_id"],
                  "max_item_tokens": max_item_tokens}
        try:
            if into is None:
                made = TreePlan(result, meta["page_size"], meta["device"], meta["capacity"])
            elif on_cpu:
                made = into._refilled(dict(result, stats=dict(stats)))  # (its buffer is the patched array)
            else:
                made = into._fill_(dict(result, stats=dict(stats)))
        except BaseException:
            self.forget()  # (the growth already describes the patched buffer)
            raise
        self._host, meta["stats"] = packed, dict(stats)
        self._plan, self._fills = weakref.ref(made), made._fills
        return made


def _host_table(kv_indptr, kv_indices, kv_last_page_len) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table as host numpy arrays (views where possible: the planner copies what the plan keeps)."""
    check_index_tensor("kv_indptr", kv_indptr)
    check_index_tensor("kv_indices", kv_indices)
    check_index_tensor("kv_last_page_len", kv_last_page_len)
    return kv_indptr.cpu().numpy(), kv_indices.cpu().numpy(), kv_last_page_len.cpu().numpy()


def _hints(num_qo_heads, num_kv_heads, num_sms, device) -> dict:
    return dict(
        num_qo_heads=None if num_qo_heads is None else check_int("num_qo_heads", num_qo_heads, 1, _INT32_MAX),
        num_kv_heads=None if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1, _INT32_MAX),
        num_sms=_sm_count(device) if num_sms is None else check_int("num_sms", num_sms, 1, _INT32_MAX),
    )


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device) -> int:
    """The SMs of a CUDA ``device``; 132 (an H100/H200's count) for other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _planner.SIZING["default_num_sms"]


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_capacity(capacity):
    if capacity is not None and not isinstance(capacity, PlanCapacity):
        raise TypeError(f"capacity: expected a treeattn.PlanCapacity or None, got {type(capacity).__name__}")
    return capacity


def _check_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected a torch.device or a device string, got {device!r}") from None


def _check_into(into, page_size: int, device, num_queries: int) -> None:
    if not isinstance(into, TreePlan):
        raise TypeError(f"into: expected a treeattn.TreePlan (made with capacity=) or None, got {type(into).__name__}")
    into._check_refillable()
    if into.page_size != page_size:
        raise ValueError(f"into: expected a plan with page_size {page_size} (the cache's), got {into.page_size}")
    want = _check_device(device)
    if want.type != into.device.type or None not in (want.index, into.device.index) and want.index != into.device.index:
        raise ValueError(f"into: expected a plan on device {want} (the cache's), got {into.device}")
    into._check_num_queries("into", num_queries)


def _staged(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ready for a non-blocking copy to ``device`` (pinned when the device is a GPU)."""
    return host.pin_memory() if device.type == "cuda" else host
