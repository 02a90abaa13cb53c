"""The static check's matrix: the calls of the public ops it records (:class:`Case`, :func:`matrix`) and the
one function that makes a case's call (:func:`run_case`), on the CPU for recording or on a GPU."""

from __future__ import annotations

import dataclasses

DTYPES = ("float16", "bfloat16")
# The benchmark workloads are recorded at this fraction of their tokens: tile choices depend on the plan's
# shape (queries per item), which the shrunk trees keep, not on the token count.
WORKLOAD_SCALE = 1 / 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a public op. ``tree``: a workload name of ``treeattn.testing.WORKLOADS`` (shrunk by
    :data:`WORKLOAD_SCALE`) or one of :data:`SMALL_TREES`."""

    op: str  # "tree_decode" | "mla_tree_decode" | "merge_state" | "cache" | "mla_cache"
    dtype: str
    tree: str = ""
    page_size: int = 16
    num_qo_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hinted: bool = True  # the plan knows the head counts (False: treeattn.plan's defaults, as in a quick start)
    kv_dtype: str = ""  # an FP8 KV cache ("float8_e4m3fn" / "float8_e5m2") with tensor scales; "": dtype

    @property
    def label(self) -> str:
        return self._label() + (f" kv {self.kv_dtype}" if self.kv_dtype else "")

    def _label(self) -> str:
        if self.op == "tree_decode":
            hint = "" if self.hinted else " unhinted"
            return (f"gqa {self.num_qo_heads}/{self.num_kv_heads}/{self.head_dim} p{self.page_size} {self.tree}"
                    f" {self.dtype}{hint}")
        if self.op == "mla_tree_decode":
            return f"mla h{self.num_qo_heads} p{self.page_size} {self.tree} {self.dtype}"
        if self.op == "merge_state":
            return f"merge_state h{self.num_qo_heads} d{self.head_dim} {self.dtype}"
        return f"{self.op} {self.num_kv_heads}x{self.head_dim} p{self.page_size} {self.dtype}"


FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")

# Trees beside the benchmark workloads: a few branches (small query blocks) and one query (split-KV decode).
SMALL_TREES = {"few_branches": ([300, 40], [1, 3]), "one_query": ([700], [1])}
GROUP_TREES = ("bestofN_P4k_N64_S256", "few_branches", "one_query")


def matrix(quick: bool = False) -> list[Case]:
    """The benchmark workloads (GQA 32/8/128 and MLA at 16-128 heads, pages 1/16/64) and common model shapes
    (GQA groups 1-16, head dims 64/96/128/256), fp16 and bf16, plus merge_state and the cache's write/copy."""
    from treeattn.testing import WORKLOADS

    cases: list[Case] = []
    dtypes = DTYPES[1:] if quick else DTYPES
    workloads = list(WORKLOADS)[:1] if quick else list(WORKLOADS)
    gqa_pages, mla_pages = ((16,), (64,)) if quick else ((1, 16, 64), (1, 16, 64))
    for dtype in dtypes:
        for tree in workloads:
            for page in gqa_pages:
                cases.append(Case("tree_decode", dtype, tree, page, 32, 8, 128))
            for heads in (16, 32, 64, 128):
                # The MLA benchmark rows use 64-token pages; the first workload also runs at 1 and 16.
                for page in mla_pages if tree == workloads[0] else (64,):
                    cases.append(Case("mla_tree_decode", dtype, tree, page, heads, 1, 576))
        for tree in ("one_query",) if quick else ("few_branches", "one_query"):
            for heads in (16, 32, 64, 128):
                cases.append(Case("mla_tree_decode", dtype, tree, 64, heads, 1, 576))
        # Model shapes: every group 1-16 at head dim 128, the usual groups at the other head dims.
        groups_by_dim = {128: range(1, 17), 64: (1, 2, 4, 7, 8, 16), 96: (1, 4, 7, 8), 256: (1, 2, 4, 7, 8, 16)}
        if quick:
            groups_by_dim = {128: (1, 7, 16), 64: (4,), 96: (4,), 256: (4,)}
        for head_dim, groups in groups_by_dim.items():
            for group in groups:
                for tree in GROUP_TREES[:1] if quick else GROUP_TREES:
                    cases.append(Case("tree_decode", dtype, tree, 16, 2 * group, 2, head_dim))
        for head_dim in (64, 96, 256):
            for page in () if quick else (1, 64):
                cases.append(Case("tree_decode", dtype, GROUP_TREES[0], page, 8, 2, head_dim))
        # A plan made without head counts sizes query blocks for group 4: larger groups get split tiles.
        for group in (8,) if quick else (8, 16):
            cases.append(Case("tree_decode", dtype, GROUP_TREES[0], 16, 2 * group, 2, 128, hinted=False))
        for heads, head_dim in ((32, 128), (7, 96), (16, 64), (8, 256), (128, 512)):
            cases.append(Case("merge_state", dtype, num_qo_heads=heads, head_dim=head_dim))
        for kv_heads, head_dim in ((8, 128), (1, 64), (2, 96), (4, 256)):
            for page in (16,) if quick else (1, 16, 64):
                cases.append(Case("cache", dtype, page_size=page, num_kv_heads=kv_heads, head_dim=head_dim))
        for page in (64,) if quick else (1, 16, 64):
            cases.append(Case("mla_cache", dtype, page_size=page, num_kv_heads=1, head_dim=576))
        # FP8 KV caches (16-bit q): the benchmark rows and the cache writes, e4m3fn everywhere, e5m2 once.
        for kv_dtype in FP8_DTYPES:
            for tree in workloads if kv_dtype == FP8_DTYPES[0] else workloads[:1]:
                cases.append(Case("tree_decode", dtype, tree, 16, 32, 8, 128, kv_dtype=kv_dtype))
                for heads in (16, 128):
                    cases.append(Case("mla_tree_decode", dtype, tree, 64, heads, 1, 576, kv_dtype=kv_dtype))
            cases.append(Case("cache", dtype, page_size=16, num_kv_heads=8, head_dim=128, kv_dtype=kv_dtype))
            cases.append(Case("mla_cache", dtype, page_size=64, num_kv_heads=1, head_dim=576, kv_dtype=kv_dtype))
    return cases


def _table(case: Case):
    from treeattn.testing import WORKLOADS, tree_table

    if case.tree in SMALL_TREES:
        levels, fanout = SMALL_TREES[case.tree]
    else:
        levels, fanout = WORKLOADS[case.tree]
        levels = [max(1, int(t * WORKLOAD_SCALE)) for t in levels]
    return tree_table(levels, fanout, case.page_size)


def run_case(case: Case, device: str = "cpu") -> None:
    """Calls the case's public op on uninitialised tensors (the values do not matter: the step records
    launches, or reads what the driver says of the kernels it ran)."""
    import torch

    import treeattn

    dtype = getattr(torch, case.dtype)
    empty = lambda *shape, dtype=dtype: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
    if case.op in ("tree_decode", "mla_tree_decode"):
        table = _table(case).to(device)
        heads = dict(num_qo_heads=case.num_qo_heads, num_kv_heads=case.num_kv_heads) if case.hinted else {}
        plan = treeattn.plan(
            table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=case.page_size, **heads
        )
        q = empty(table.num_queries, case.num_qo_heads, case.head_dim)
        kv_dtype = getattr(torch, case.kv_dtype) if case.kv_dtype else dtype
        if case.op == "tree_decode":
            shape = (table.num_pages, case.page_size, case.num_kv_heads, case.head_dim)
            # FP8: per-KV-head scale tensors (float scales compile to the same kernel without the scale loads).
            scales = {}
            if case.kv_dtype:
                scale = torch.ones(case.num_kv_heads, device=device)
                scales = dict(k_scale=scale, v_scale=scale)
            treeattn.tree_decode(q, empty(*shape, dtype=kv_dtype), empty(*shape, dtype=kv_dtype), plan, **scales)
        else:
            scales = dict(kv_scale=torch.ones((), device=device)) if case.kv_dtype else {}
            treeattn.mla_tree_decode(q, empty(table.num_pages, case.page_size, case.head_dim, dtype=kv_dtype), plan,
                                     sm_scale=192**-0.5, **scales)
    elif case.op == "merge_state":
        o = empty(5, case.num_qo_heads, case.head_dim)
        lse = empty(5, case.num_qo_heads, dtype=torch.float32)
        treeattn.merge_state(o, lse, o, lse)
    else:
        # Prefill a prompt ending mid-page, fork, append one token per branch (copy-on-write of the shared
        # partial page), write the step's rows: every write/copy launch a decode loop makes.
        page = case.page_size
        # An FP8 cache quantizes the 16-bit rows it is given in its write launch.
        cache_dtype = getattr(torch, case.kv_dtype) if case.kv_dtype else dtype
        if case.op == "cache":
            scales = dict(k_scale=1.0, v_scale=1.0) if case.kv_dtype else {}
            cache = treeattn.TreeKVCache(1, case.num_kv_heads, case.head_dim, page_size=page, num_pages=64,
                                         dtype=cache_dtype, device=device, **scales)
            row = (case.num_kv_heads, case.head_dim)
        else:
            scales = dict(kv_scale=1.0) if case.kv_dtype else {}
            cache = treeattn.TreeKVCache.mla(1, page_size=page, num_pages=64, dtype=cache_dtype, device=device,
                                             **scales)
            row = (case.head_dim,)
        prompt = page + max(1, page // 2) if page > 1 else 3
        root = cache.add(prompt)
        leaves = cache.fork(root, 3)
        for slots in (cache.slots(root), cache.append(leaves)):
            rows = [empty(slots.shape[0], *row)] * (1 if case.op == "mla_cache" else 2)
            cache.write(0, slots, *rows)
