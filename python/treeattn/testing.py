"""Workloads shared by the tests and the benchmarks (so they never drift): paged tables of prefix trees,
random tables, and KV caches whose unused slots hold NaN (any stray read shows up in the output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "PagedTable",
    "DecodeResult",
    "check_decode",
    "tree_table",
    "random_table",
    "poisoned_cache",
    "FP8_NAN_BYTE",
    "fp8_cache",
    "WORKLOADS",
    "workload_table",
    "relative_error",
    "TOLERANCE",
    "assert_close",
    "assert_same_plan",
]

# ‖out − ref‖ / ‖ref‖ bound against the fp32 reference, by the dtype the result is stored in.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class PagedTable:
    """A decode step's CSR page table (docs/design.md, semantics) plus the pool size it needs."""

    kv_indptr: torch.Tensor  # int32 [n + 1]
    kv_indices: torch.Tensor  # int32 [nnz]
    kv_last_page_len: torch.Tensor  # int32 [n]
    page_size: int
    num_pages: int

    @property
    def num_queries(self) -> int:
        return self.kv_last_page_len.shape[0]

    def to(self, device) -> PagedTable:
        return PagedTable(
            self.kv_indptr.to(device), self.kv_indices.to(device), self.kv_last_page_len.to(device),
            self.page_size, self.num_pages,
        )

    @property
    def arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kv_indptr, kv_indices, kv_last_page_len)``, in the order the planner and the reference take them."""
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len

    @property
    def empty_queries(self) -> torch.Tensor:
        """bool ``[num_queries]``: the queries with no pages (their output is 0, their LSE -inf)."""
        return self.kv_indptr[1:] == self.kv_indptr[:-1]

    def token_slots(self, query: int) -> torch.Tensor:
        """int64 flat slots (page * page_size + offset) of the query's KV, in order."""
        from .reference import gather_kv_tokens

        return gather_kv_tokens(*self.arrays, self.page_size, query)

    def plan(self, **kw):
        """``treeattn.plan`` of this table with its page size and pool size (page ids checked against
        ``num_pages``); ``kw`` goes to the planner (``num_qo_heads``, ``num_kv_heads``, ``num_sms``, ``device``,
        ``share_prefixes``, ``capacity``)."""
        from .plan import plan

        kw.setdefault("num_pages", self.num_pages)
        return plan(*self.arrays, page_size=self.page_size, **kw)

    def reference(self, q: torch.Tensor, *caches: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 reference ``(o, lse)`` of a decode step over this table, on ``q``'s device:
        ``reference(q, k_cache, v_cache, **kw)`` is ``treeattn.reference.tree_decode``,
        ``reference(q, kv_cache, sm_scale=..., v_head_dim=..., **kw)`` is ``treeattn.reference.mla_tree_decode``."""
        from . import reference

        arrays = tuple(t.to(q.device) for t in self.arrays)
        if len(caches) == 2:
            return reference.tree_decode(q, *caches, *arrays, **kw)
        if len(caches) == 1:
            return reference.mla_tree_decode(q, *caches, *arrays, **kw)
        raise ValueError(f"caches: expected (k_cache, v_cache) or (kv_cache,), got {len(caches)} tensors")


def _csr(rows: list[list[int]], last_lens: list[int], page_size: int, num_pages: int, perm) -> PagedTable:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    indptr = torch.zeros(len(rows) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lengths, 0)
    flat = torch.tensor([p for r in rows for p in r], dtype=torch.int64)
    if perm is not None and flat.numel():
        flat = perm[flat]
    return PagedTable(
        indptr.to(torch.int32), flat.to(torch.int32), torch.tensor(last_lens, dtype=torch.int32), page_size, num_pages
    )


def tree_table(
    level_tokens: list[int],
    fanout: list[int],
    page_size: int,
    *,
    shuffle: bool = True,
    spare_pages: int = 0,
    generator: torch.Generator | None = None,
) -> PagedTable:
    """Table of a uniform prefix tree: level ``l`` has ``prod(fanout[:l+1])`` nodes of ``level_tokens[l]`` tokens.

    One query per leaf attends its root→leaf path. Pages are allocated like a copy-on-write paged cache: a
    node's full pages are shared by all its descendants; a node ending mid-page hands its partial page's
    tokens to each child, which starts its own page with them. ``shuffle`` permutes page ids (as a
    long-running pool would); ``spare_pages`` adds pages no query uses.

    Example: ``tree_table([4096, 256], [1, 64], 16)`` is best-of-64 with a 4096-token prompt.
    """
    if len(level_tokens) != len(fanout):
        raise ValueError(f"fanout: expected {len(level_tokens)} levels like level_tokens, got {len(fanout)}")
    next_page = 0
    # Each frontier entry: (pages of the path so far, tokens carried in an unfinished page).
    frontier: list[tuple[list[int], int]] = [([], 0)]
    for tokens, ways in zip(level_tokens, fanout):
        grown = []
        for pages, carry in frontier:
            for _ in range(ways):
                total = carry + tokens
                full, rest = divmod(total, page_size)
                own = list(range(next_page, next_page + full))
                next_page += full
                grown.append((pages + own, rest))
        frontier = grown
    rows, last = [], []
    for pages, rest in frontier:
        if rest:
            pages = pages + [next_page]
            next_page += 1
        rows.append(pages)
        last.append(rest if rest else page_size)
    num_pages = next_page + spare_pages
    perm = torch.randperm(num_pages, generator=generator) if shuffle else None
    return _csr(rows, last, page_size, num_pages, perm)


def random_table(
    num_queries: int,
    page_size: int,
    *,
    max_pages: int = 8,
    pool_pages: int = 16,
    empty_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> PagedTable:
    """Queries with random page lists drawn from a small pool: shared prefixes, repeats at other depths,
    identical queries and empty queries all occur. Any valid table must give exact attention."""
    g = generator
    rows, last = [], []
    for _ in range(num_queries):
        if torch.rand((), generator=g).item() < empty_prob:
            rows.append([])
            last.append(int(torch.randint(1, page_size + 1, (), generator=g)))
            continue
        if rows and rows[-1] and torch.rand((), generator=g).item() < 0.6:
            # Branch off an earlier query: keep a random prefix of its pages.
            donor = rows[int(torch.randint(0, len(rows), (), generator=g))] or [0]
            keep = int(torch.randint(0, len(donor) + 1, (), generator=g))
            pages = donor[:keep]
        else:
            pages = []
        extra = 0
        if len(pages) < max_pages:
            extra = int(torch.randint(0 if pages else 1, max_pages - len(pages) + 1, (), generator=g))
        pages = pages + torch.randint(0, pool_pages, (extra,), generator=g).tolist()
        if not pages:
            pages = [int(torch.randint(0, pool_pages, (), generator=g))]
        rows.append(pages)
        last.append(int(torch.randint(1, page_size + 1, (), generator=g)))
    return _csr(rows, last, page_size, pool_pages, None)


def poisoned_cache(
    table: PagedTable, shape_tail: tuple[int, ...], dtype: torch.dtype, device, *, generator=None
) -> torch.Tensor:
    """Random cache ``[num_pages, page_size, *shape_tail]`` with NaN in every slot no query attends."""
    cache = torch.randn(table.num_pages, table.page_size, *shape_tail, generator=generator, dtype=torch.float32)
    used = torch.zeros(table.num_pages * table.page_size, dtype=torch.bool)
    for i in range(table.num_queries):
        used[table.token_slots(i).cpu()] = True
    cache.view(table.num_pages * table.page_size, -1)[~used] = float("nan")
    return cache.to(dtype=dtype, device=device)


# 0x7F is NaN in both FP8 formats (e4m3fn: S.1111.111; e5m2: S.11111.11 with a nonzero mantissa).
FP8_NAN_BYTE = 0x7F


def fp8_cache(
    table: PagedTable,
    shape_tail: tuple[int, ...],
    dtype: torch.dtype,
    device,
    *,
    per_head: bool = False,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 cache ``[num_pages, page_size, *shape_tail]`` and its fp32 scale, with the NaN byte
    :data:`FP8_NAN_BYTE` in every slot no query attends.

    The values behind the cache are normal with a different magnitude per head (dim -2 when
    ``shape_tail`` has two dims), so a per-head scale matters; ``per_head`` gives a scale ``[shape_tail[0]]``
    (one per KV head), else a scalar tensor ``[]``. Each scale maps its largest value onto the format's
    largest finite value. True values are ``reference.dequantize(cache, scale)``.
    """
    from .reference import quantize

    g = generator
    values = poisoned_cache(table, shape_tail, torch.float32, "cpu", generator=g)
    if len(shape_tail) == 2:
        values *= 2.0 ** torch.randint(-3, 4, (shape_tail[0], 1), generator=g).float()
    finite = torch.nan_to_num(values, nan=0.0).abs()
    if per_head:
        if len(shape_tail) != 2:
            raise ValueError(f"shape_tail: expected (num_kv_heads, head_dim) for per_head scales, got {shape_tail}")
        amax = finite.amax(dim=(0, 1, 3))
    else:
        amax = finite.amax()
    scale = (amax.clamp_min(1e-6) / torch.finfo(dtype).max).float()
    cache = quantize(values, scale, dtype)
    cache.view(torch.uint8)[values.isnan()] = FP8_NAN_BYTE
    return cache.to(device), scale.to(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; NaN anywhere gives NaN."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, tol: float | torch.dtype | None = None, what: str = "out"
) -> None:
    """The one accuracy check of the tests: ``relative_error(out, ref) < tol``.

    ``tol`` is a number, a dtype (its :data:`TOLERANCE`), or None for ``out``'s dtype. Shapes must match;
    an all-zero reference needs an all-zero ``out`` (a relative error means nothing there); NaN fails.
    """
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {list(out.shape)} != reference {list(ref.shape)}"
    if tol is None:
        tol = out.dtype
    if isinstance(tol, torch.dtype):
        tol = TOLERANCE[tol]
    if ref.numel() and not bool(ref.float().abs().max() > 0):
        assert bool((out.float() == 0).all()), (
            f"{what}: expected zeros like the reference, got max |out| {out.float().abs().max().item():.3e}"
        )
        return
    err = relative_error(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


@dataclass
class DecodeResult:
    """What :func:`check_decode` ran and got."""

    plan: object  # the TreePlan used (its stats are what tests assert on)
    q: torch.Tensor
    caches: tuple[torch.Tensor, ...]  # (k_cache, v_cache) or (kv_cache,)
    scales: dict  # k_scale / v_scale / kv_scale for FP8 caches, else empty
    out: torch.Tensor
    lse: torch.Tensor


def check_decode(
    table: PagedTable,
    num_qo_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device,
    *,
    num_kv_heads: int | None = None,
    v_head_dim: int | None = None,
    cache_dtype: torch.dtype | None = None,
    per_head_scales: bool = False,
    float_scales: bool = False,
    sm_scale: float | None = None,
    q_scale: float = 1.0,
    plan=None,
    plan_kw: dict | None = None,
    lse_tol: float | None = None,
    seed: int | None = None,
) -> DecodeResult:
    """The one decode check of the tests: run ``tree_decode`` (``num_kv_heads`` given) or ``mla_tree_decode``
    (``v_head_dim`` given) on fresh random inputs over ``table`` and compare with the fp32 reference.

    ``q``: ``[num_queries, num_qo_heads, head_dim]`` in ``dtype`` (times ``q_scale``); the caches are
    :func:`poisoned_cache` (NaN in every slot no query attends) of ``cache_dtype`` (default ``dtype``), or
    :func:`fp8_cache` with its scale (``per_head_scales``: one per KV head; ``float_scales``: as Python floats)
    when ``cache_dtype`` is a float8 type. MLA's cache is ``[num_pages, page_size, head_dim]`` and its
    ``sm_scale`` defaults to DeepSeek's ``1/sqrt(head_dim - v_head_dim + 128)``. ``plan`` defaults to
    ``table.plan(**plan_kw)`` with the step's head counts as hints (``plan_kw`` overrides them).

    Checks: shapes and dtypes; no NaN (a poisoned slot read); empty queries give 0 and -inf; ``out`` within
    ``dtype``'s tolerance and ``lse`` within ``lse_tol`` (default fp32's; fp16's for FP8 caches) of the reference,
    its error measured against ``max(‖lse‖, √n)`` (an LSE's error is the normaliser's relative error).
    ``seed`` makes the inputs reproducible (None: torch's global generator).
    """
    from . import mla_tree_decode, tree_decode

    if (num_kv_heads is None) == (v_head_dim is None):
        raise ValueError("num_kv_heads, v_head_dim: expected exactly one (tree_decode or mla_tree_decode), "
                         f"got {num_kv_heads}, {v_head_dim}")
    mla = v_head_dim is not None
    g = None if seed is None else torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    fp8 = cache_dtype.itemsize == 1
    table = table.to(device)
    q = (torch.randn(table.num_queries, num_qo_heads, head_dim, generator=g) * q_scale).to(dtype=dtype, device=device)
    shape_tail = (head_dim,) if mla else (num_kv_heads, head_dim)
    caches, scales = [], []
    for _ in range(1 if mla else 2):
        if fp8:
            cache, scale = fp8_cache(table, shape_tail, cache_dtype, device, per_head=per_head_scales, generator=g)
            scales.append(float(scale) if float_scales else scale)
        else:
            cache = poisoned_cache(table, shape_tail, cache_dtype, device, generator=g)
        caches.append(cache)
    scale_kw = dict(zip(("kv_scale",) if mla else ("k_scale", "v_scale"), scales))
    if plan is None:
        hints = {"num_qo_heads": num_qo_heads, "num_kv_heads": 1 if mla else num_kv_heads}
        plan = table.plan(**{**hints, **(plan_kw or {})})
    if mla:
        sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim - v_head_dim + 128)
        op_kw = dict(sm_scale=sm_scale, v_head_dim=v_head_dim, **scale_kw)
        out, lse = mla_tree_decode(q, *caches, plan, return_lse=True, **op_kw)
    else:
        op_kw = dict(sm_scale=sm_scale, **scale_kw)
        out, lse = tree_decode(q, *caches, plan, return_lse=True, **op_kw)
    out_ref, lse_ref = table.reference(q, *caches, **op_kw)

    assert out.shape == (table.num_queries, num_qo_heads, v_head_dim or head_dim) and out.dtype == dtype
    assert lse.shape == (table.num_queries, num_qo_heads) and lse.dtype == torch.float32
    empty = table.empty_queries
    assert not torch.isnan(out).any() and not torch.isnan(lse[~empty]).any(), "NaN: a poisoned slot was read"
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all(), "empty queries: expected o = 0, lse = -inf"
    assert_close(out, out_ref, dtype)
    if lse_tol is None:
        lse_tol = TOLERANCE[torch.float16 if fp8 else torch.float32]
    # The LSE is a log: its error is the relative error of the softmax normaliser, so the norm it is measured
    # against is at least 1 per query (a relative error of an LSE near 0 would only measure fp32 rounding).
    got, want = lse[~empty], lse_ref[~empty]
    lse_err = (got - want).norm() / want.norm().clamp_min(max(want.numel(), 1) ** 0.5)
    assert lse_err < lse_tol, f"lse: error {lse_err:.3e} (against max(‖lse‖, √n)) >= {lse_tol:.1e}"
    return DecodeResult(plan, q, tuple(caches), scale_kw, out, lse)


def assert_same_plan(a, b) -> None:
    """Two TreePlans are the same plan: every device tensor (dtype and values), the stats and the sizes and
    bounds the kernels specialise on."""
    from .plan import PLAN_TENSOR_FIELDS

    for name in PLAN_TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.stats == b.stats
    for name in ("num_items", "num_partial_rows", "max_queries_per_item", "max_item_tokens", "max_page_id"):
        assert getattr(a, name) == getattr(b, name), name


# The benchmark workloads of docs/design.md (targets): name -> (level_tokens, fanout). GQA rows use 32 q / 8 kv
# heads, head_dim 128, page 16.
WORKLOADS: dict[str, tuple[list[int], list[int]]] = {
    "bestofN_P4k_N64_S256": ([4096, 256], [1, 64]),
    "tree_2k_4x1k_4x512_4x128": ([2048, 1024, 512, 128], [1, 4, 4, 4]),
    "longcot_P1k_N32_S8k": ([1024, 8192], [1, 32]),
    "hydragen_P8k_N256_S64": ([8192, 64], [1, 256]),
}


def workload_table(name: str, page_size: int = 16, *, scale: float = 1.0, generator=None) -> PagedTable:
    """Table of a named benchmark workload; ``scale`` < 1 shrinks every level's tokens (for CPU tests)."""
    level_tokens, fanout = WORKLOADS[name]
    tokens = [max(1, int(t * scale)) for t in level_tokens]
    return tree_table(tokens, fanout, page_size, generator=generator)
