"""The peers treeattn is measured against, on the same tables, caches and queries, in the same run.

GQA (``GQA_PEERS``): FlashInfer's paged batch decode over the per-branch page tables, without and with tensor
cores; FlashInfer's multi-level cascade with one level per tree depth (the shared pages of each depth as one
level, given to it as a declared shared prefix), with its default backend and with fa2; torch
``flex_attention`` over the pool with an ancestor block mask; torch SDPA over a per-branch copy of the cache;
and a per-branch split-KV Triton decode (``splitkv_triton.py``). MLA (``MLA_PEERS``): FlashInfer's
``BatchMLAPagedAttentionWrapper`` and the same split-KV decode. FlashInfer rows need ``flashinfer`` importable
(``docs/benchmarks.md`` says how to bring its wheels to a machine without network).

Each builder takes a :class:`Case` and returns a zero-argument function (the timed call, its output the
attention output) after any planning, compiling and copying, which stay untimed. ``time_peers`` times them
with :func:`common.time_us` (do_bench median after warm-up, L2 flushed between repetitions): the Triton peers
and SDPA as CUDA-graph replays like treeattn, FlashInfer and flex_attention launched eagerly (their own graph
modes need other wrappers). Without a GPU every peer is recorded as skipped, with the reason.

``TREEATTN_PEERS`` (comma-separated names, or ``none``) limits which peers run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import common
import splitkv_triton as splitkv_kernels
import torch

from treeattn.testing import PagedTable, relative_error

NO_GPU = "no GPU: torch.cuda.is_available() is False"
# Largest relative difference from treeattn's output a peer may show and still count: both are bf16 results
# within 1e-2 of the fp32 reference.
AGREEMENT = 2e-2
WORKSPACE_BYTES = 256 << 20


@dataclass
class Case:
    """One benchmark row's inputs, as treeattn gets them.

    GQA: q ``[n, Hq, D]``, k_cache/v_cache ``[pages, page_size, Hkv, D]``. MLA: q ``[n, H, 576]``, k_cache the
    latent cache ``[pages, page_size, 576]`` with ``rope_dim`` 64, v_cache None. ``fanout``: the tree's
    branching per depth when the table is a uniform tree (``treeattn.testing.WORKLOADS``), for the cascade.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor | None
    table: PagedTable
    sm_scale: float
    fanout: list[int] | None = None
    rope_dim: int = 0

    @property
    def mla(self) -> bool:
        return self.v_cache is None


# ---- per-branch split-KV Triton decode -------------------------------------------------------------------

SPLITS = (1, 2, 4, 8, 16, 32)


def _splitkv_args(case: Case):
    """(k, v, block_n, num_warps): tiles that compile for sm_90a without register spill (GQA d128: 243
    registers; MLA 512 + 64: 209)."""
    if case.mla:
        k = case.k_cache.unsqueeze(2)  # one latent "KV head"
        return k, k[..., : k.shape[-1] - case.rope_dim], 16, 8
    return case.k_cache, case.v_cache, 64, 8


def splitkv_triton(case: Case, num_splits: int | None = None):
    """The split-KV decode with ``num_splits`` (default: :func:`splitkv_kernels.default_num_splits`)."""
    k, v, block_n, num_warps = _splitkv_args(case)
    t = case.table
    n, num_qo_heads = case.q.shape[:2]
    if num_splits is None:
        lengths = (t.kv_indptr[1:] - t.kv_indptr[:-1] - 1) * t.page_size + t.kv_last_page_len
        num_splits = splitkv_kernels.default_num_splits(n, k.shape[2], num_qo_heads // k.shape[2],
                                                       int(lengths.max()), block_n)
    out = case.q.new_empty(n, num_qo_heads, v.shape[-1])
    part = splitkv_kernels.workspace(n, num_qo_heads, v.shape[-1], num_splits, case.q.device)
    return lambda: splitkv_kernels.splitkv_decode(
        case.q, k, v, t.kv_indptr, t.kv_indices, t.kv_last_page_len, num_splits=num_splits,
        sm_scale=case.sm_scale, rope_dim=case.rope_dim, out=out, part=part, block_n=block_n, num_warps=num_warps)


def time_splitkv_triton(row: dict, case: Case) -> None:
    """The split-KV decode at its best split count (each timed): ``splitkv_triton_us`` and ``_splits``."""
    best = None
    for splits in SPLITS:
        us = common.time_us(splitkv_triton(case, splits))
        if best is None or us < best[0]:
            best = (us, splits)
    row["splitkv_triton_us"], row["splitkv_triton_splits"] = best


# ---- torch ---------------------------------------------------------------------------------------------

def sdpa_duplicated(case: Case):
    """Per-branch baseline: each query's KV gathered into its own dense copy, then torch SDPA (GQA)."""
    q, t = case.q, case.table
    n, hkv, d = q.shape[0], case.k_cache.shape[2], case.k_cache.shape[3]
    slots = [t.token_slots(i) for i in range(n)]
    max_len = max(s.numel() for s in slots)
    k_flat = case.k_cache.reshape(-1, hkv, d)
    v_flat = case.v_cache.reshape(-1, hkv, case.v_cache.shape[-1])
    k = q.new_zeros(n, hkv, max_len, d)
    v = q.new_zeros(n, hkv, max_len, v_flat.shape[-1])
    mask = torch.zeros(n, 1, 1, max_len, dtype=torch.bool, device=q.device)
    for i, s in enumerate(slots):
        k[i, :, : s.numel()] = k_flat[s].transpose(0, 1)
        v[i, :, : s.numel()] = v_flat[s].transpose(0, 1)
        mask[i, ..., : s.numel()] = True
    attn_mask = None if bool(mask.all()) else mask
    q4 = q[:, :, None, :]
    return lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, k, v, attn_mask=attn_mask, scale=case.sm_scale, enable_gqa=True)[:, :, 0]


def ancestor_mask(table: PagedTable) -> torch.Tensor:
    """bool ``[n, num_pages * page_size]``: query ``i`` attends pool slot ``j`` (its root→leaf path)."""
    allowed = torch.zeros(table.num_queries, table.num_pages * table.page_size, dtype=torch.bool,
                          device=table.kv_indptr.device)
    for i in range(table.num_queries):
        allowed[i, table.token_slots(i)] = True
    return allowed


def flex_attention(case: Case, compile: bool = True):
    """torch flex_attention: all queries as one sequence over the whole pool (one copy of each token), the
    tree as a block mask of each query's ancestors. If the default (decoding) kernel has no valid choice for
    the shape, the general flex kernel is forced (``kernel_options``)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    q, t = case.q, case.table
    n, hkv = q.shape[0], case.k_cache.shape[2]
    slots = t.num_pages * t.page_size
    k = case.k_cache.reshape(slots, hkv, -1).transpose(0, 1)[None].contiguous()  # [1, Hkv, slots, D]
    v = case.v_cache.reshape(slots, hkv, -1).transpose(0, 1)[None].contiguous()
    qf = q.transpose(0, 1)[None].contiguous()  # [1, Hq, n, D]
    allowed = ancestor_mask(t)

    def ancestors(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    block_mask = create_block_mask(ancestors, None, None, n, slots, device=q.device)
    fn = torch.compile(flex, dynamic=False) if compile else flex

    def run(options=None):
        return fn(qf, k, v, block_mask=block_mask, scale=case.sm_scale, enable_gqa=True,
                  kernel_options=options)[0].transpose(0, 1)

    try:
        run()
    except Exception:  # the decoding kernel's autotuner found no valid config for this shape
        forced = {"FORCE_USE_FLEX_ATTENTION": True}
        run(forced)
        return lambda: run(forced)
    return run


# ---- FlashInfer ----------------------------------------------------------------------------------------

def flashinfer_version() -> str:
    """flashinfer's version, or why it is not importable."""
    try:
        import flashinfer
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"[:200]
    return getattr(flashinfer, "__version__", "unknown")


def _workspace(device) -> torch.Tensor:
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def flashinfer_decode(case: Case, use_tensor_cores: bool = False):
    """BatchDecodeWithPagedKVCacheWrapper over the per-branch page tables (each query its whole list)."""
    import flashinfer

    t, q = case.table, case.q
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(q.device), "NHD",
                                                            use_tensor_cores=use_tensor_cores)
    wrapper.plan(t.kv_indptr, t.kv_indices, t.kv_last_page_len, q.shape[1], case.k_cache.shape[2], q.shape[2],
                 t.page_size, q_data_type=q.dtype, kv_data_type=case.k_cache.dtype, sm_scale=case.sm_scale)
    return lambda: wrapper.run(q, (case.k_cache, case.v_cache))


def flashinfer_decode_tc(case: Case):
    return flashinfer_decode(case, use_tensor_cores=True)


def cascade_levels(table: PagedTable, fanout: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """The table as FlashInfer cascade levels, one per tree depth: (qo_indptr, kv_indptr, kv_indices,
    kv_last_page_len) each. Level ``l`` has one entry per node at depth ``l`` (the consecutive queries below
    it, ``prod(fanout[l+1:])`` of them) holding the pages all of them share beyond the levels above; the last
    level holds each query's remaining pages. Only full pages are shared (a query's last page stays in the
    last level), so the levels concatenate back to every query's page list."""
    n = table.num_queries
    indptr, indices = table.kv_indptr.tolist(), table.kv_indices.tolist()
    pages = [indices[indptr[i]:indptr[i + 1]] for i in range(n)]
    taken = [0] * n  # pages of each query given to the levels so far
    levels = []
    for depth in range(len(fanout)):
        last = depth == len(fanout) - 1
        size = 1
        for ways in fanout[depth + 1:]:
            size *= ways
        if n % size:
            raise ValueError(f"fanout: expected a tree whose leaves are the {n} queries, got {fanout}")
        qo, kv_indptr, kv_indices, last_len = [0], [0], [], []
        for first in range(0, n, size):
            group = pages[first:first + size]
            end = len(group[0]) if last else min(len(p) for p in group) - 1
            for other in group[1:]:  # the pages every query of the group has at the same place
                j = taken[first]
                while j < end and other[j] == group[0][j]:
                    j += 1
                end = j
            end = max(end, taken[first])
            kv_indices += group[0][taken[first]:end]
            for i in range(first, first + size):
                taken[i] = end
            qo.append(first + size)
            kv_indptr.append(len(kv_indices))
            last_len.append(int(table.kv_last_page_len[first]) if last else table.page_size)
        device = table.kv_indptr.device
        levels.append(tuple(torch.tensor(x, dtype=torch.int32, device=device)
                            for x in (qo, kv_indptr, kv_indices, last_len)))
    return levels


def flashinfer_cascade(case: Case, backend: str | None = None):
    """MultiLevelCascadeAttentionWrapper, one level per tree depth (:func:`cascade_levels`). ``backend``
    replaces the per-level prefill wrappers with ones of that backend (``"fa2"``); None keeps its default."""
    import flashinfer

    if case.fanout is None:
        raise ValueError("fanout: the cascade needs the tree's levels, got None")
    q = case.q
    levels = cascade_levels(case.table, case.fanout)
    workspace = _workspace(q.device)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(len(levels), workspace, "NHD")
    if backend is not None:
        wrapper._batch_prefill_wrappers = [
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend) for _ in levels]
    wrapper.plan(*(list(x) for x in zip(*levels)), q.shape[1], case.k_cache.shape[2], q.shape[2],
                 case.table.page_size, sm_scale=case.sm_scale, q_data_type=q.dtype, kv_data_type=case.k_cache.dtype)
    return lambda: wrapper.run(q, (case.k_cache, case.v_cache))


def flashinfer_cascade_fa2(case: Case):
    return flashinfer_cascade(case, backend="fa2")


def flashinfer_mla(case: Case):
    """BatchMLAPagedAttentionWrapper over the per-branch page tables (absorbed MLA, 512 + 64)."""
    import flashinfer

    q, t = case.q, case.table
    n, num_heads, width = q.shape
    kv_lora = width - case.rope_dim
    wrapper = flashinfer.BatchMLAPagedAttentionWrapper(_workspace(q.device))
    kv_len = (t.kv_indptr[1:] - t.kv_indptr[:-1] - 1) * t.page_size + t.kv_last_page_len
    wrapper.plan(torch.arange(n + 1, dtype=torch.int32, device=q.device), t.kv_indptr, t.kv_indices,
                 kv_len.to(torch.int32), num_heads, kv_lora, case.rope_dim, t.page_size, False, case.sm_scale,
                 q.dtype, case.k_cache.dtype)
    q_nope, q_pe = q[..., :kv_lora].contiguous(), q[..., kv_lora:].contiguous()
    ckv, kpe = case.k_cache[..., :kv_lora].contiguous(), case.k_cache[..., kv_lora:].contiguous()
    return lambda: wrapper.run(q_nope, q_pe, ckv, kpe)


# ---- running them --------------------------------------------------------------------------------------

# name -> (builder, timed as a CUDA-graph replay). FlashInfer last: its first use JIT-compiles for minutes.
GQA_PEERS = {
    "splitkv_triton": (splitkv_triton, True),
    "sdpa_duplicated": (sdpa_duplicated, True),
    "flex_attention": (flex_attention, False),
    "flashinfer_decode": (flashinfer_decode, False),
    "flashinfer_decode_tc": (flashinfer_decode_tc, False),
    "flashinfer_cascade": (flashinfer_cascade, False),
    "flashinfer_cascade_fa2": (flashinfer_cascade_fa2, False),
}
MLA_PEERS = {
    "splitkv_triton": (splitkv_triton, True),
    "flashinfer_mla": (flashinfer_mla, False),
}


def selected(peers: dict) -> list[str]:
    """The peers ``TREEATTN_PEERS`` names (all when unset)."""
    wanted = os.environ.get("TREEATTN_PEERS", "").strip()
    if not wanted:
        return list(peers)
    names = {w.strip() for w in wanted.split(",")}
    return [p for p in peers if p in names]


def versions() -> dict:
    """What the peers ran on, for the results' ``env``."""
    import triton

    return {"flashinfer": flashinfer_version(), "torch": torch.__version__, "triton": triton.__version__}


def skip_all(row: dict, peers: dict, reason: str = NO_GPU) -> None:
    """Records every peer of ``peers`` as skipped with ``reason`` (``row["peers_skipped"]``)."""
    row["peers_skipped"] = {name: reason for name in peers}


def time_peers(row: dict, case: Case, peers: dict, reference: torch.Tensor | None = None) -> None:
    """Times each selected peer into ``row["<peer>_us"]``; a peer that cannot be built or run gets
    ``row["<peer>_error"]``, one not selected a ``peers_skipped`` entry. With ``reference`` (treeattn's output)
    each peer's ``<peer>_rel_err_vs_treeattn`` is recorded too."""
    chosen = selected(peers)
    skipped = {name: "not in TREEATTN_PEERS" for name in peers if name not in chosen}
    for name in chosen:
        if name.startswith("flashinfer") and not flashinfer_version()[:1].isdigit():
            skipped[name] = f"flashinfer {flashinfer_version()}"
            continue
        build, graph = peers[name]
        try:
            fn = build(case)
            out = fn()
            if reference is not None:
                err = row[f"{name}_rel_err_vs_treeattn"] = relative_error(out.reshape(reference.shape), reference)
                if not err < AGREEMENT:  # a wrong answer is not timed (nor a candidate for the best peer)
                    row[f"{name}_error"] = f"output differs from treeattn's: relative error {err:.2e}"
                    continue
            if build is splitkv_triton:
                time_splitkv_triton(row, case)
            else:
                row[f"{name}_us"] = common.time_us(fn, graph=graph)
        except Exception as exc:
            row[f"{name}_error"] = common.error_text(exc)
        finally:
            torch.cuda.empty_cache()
    if skipped:
        row["peers_skipped"] = skipped
    timed = {name: row[f"{name}_us"] for name in peers if row.get(f"{name}_us")}
    if timed and row.get("treeattn_us"):
        best = min(timed, key=timed.get)
        row["best_peer"] = best
        row["speedup_vs_best_peer"] = timed[best] / row["treeattn_us"]
