"""A per-branch split-KV decode in Triton: the kind of paged decode kernel SGLang and vLLM ship, kept here as
a benchmark peer. Every query reads its whole KV list on its own (no sharing); each list is cut into
``num_splits`` chunks read in parallel.

Stage 1: one program per (query, block of ``BLOCK_H`` query heads of one KV head, KV split) streams its chunk
through an online softmax and writes a normalised partial output and its log-sum-exp. Stage 2: one program
per (query, query head) merges the splits. Tiles stay GPU-legal (``BLOCK_H`` 16 rows, power-of-two widths),
so what passes in the interpreter also compiles for the GPU.

GQA: ``k_cache`` ``[pages, page_size, Hkv, D]``, ``v_cache`` ``[pages, page_size, Hkv, Dv]``. MLA (absorbed):
``k_cache`` the latent cache ``[pages, page_size, 1, 512 + 64]`` with ``rope_dim=64`` and ``v_cache`` the view
``k_cache[..., :512]``; the score is split into a 512-wide and a 64-wide dot.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_H = 16  # query heads per stage-1 program (tl.dot needs 16 rows; smaller groups are padded)
LOG2E = 1.4426950408889634


@triton.jit
def _stage1(Q, K, V, KV_INDPTR, KV_INDICES, KV_LAST, PART_O, PART_LSE,
            qk_scale, page_size, group, head_blocks, num_splits,
            stride_qn, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
            stride_on, stride_os, stride_oh, stride_ln, stride_ls,
            DK: tl.constexpr, DR: tl.constexpr, HAS_ROPE: tl.constexpr, DV: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    qi = tl.program_id(0)
    kv_head = tl.program_id(1) // head_blocks
    first = (tl.program_id(1) % head_blocks) * BLOCK_H
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_H)
    head_ok = first + rows < group
    heads = kv_head * group + first + rows
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)

    page_start = tl.load(KV_INDPTR + qi)
    num_pages = tl.load(KV_INDPTR + qi + 1) - page_start
    kv_len = tl.where(num_pages > 0, (num_pages - 1) * page_size + tl.load(KV_LAST + qi), 0)
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(kv_len, start + chunk)

    q_rows = Q + qi.to(tl.int64) * stride_qn + heads[:, None].to(tl.int64) * stride_qh
    q = tl.load(q_rows + dk[None, :], mask=head_ok[:, None], other=0.0)
    if HAS_ROPE:
        dr = tl.arange(0, DR)
        q_rope = tl.load(q_rows + DK + dr[None, :], mask=head_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV], tl.float32)
    for t in range(start, end, BLOCK_N):
        tok = t + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        # int32 element offsets (a cache under 2**31 elements, checked on the host): 64-bit pointer tiles
        # would take twice the registers.
        page = tl.load(KV_INDICES + page_start + tok // page_size, mask=tok_ok, other=0)
        k_rows = page * stride_kp + (tok % page_size) * stride_kt + kv_head * stride_kh
        k = tl.load(K + (k_rows[:, None] + dk[None, :]), mask=tok_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_ROPE:
            k_rope = tl.load(K + (k_rows[:, None] + DK + dr[None, :]), mask=tok_ok[:, None], other=0.0)
            s += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        s = tl.where(tok_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = page * stride_vp + (tok % page_size) * stride_vt + kv_head * stride_vh
        v = tl.load(V + (v_rows[:, None] + dv[None, :]), mask=tok_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # An empty split leaves m_i = -inf and l_i = 0: it writes o = 0 and lse = -inf (weight 0 in stage 2).
    empty = l_i == 0.0
    o = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_rows = PART_O + qi.to(tl.int64) * stride_on + split * stride_os + heads[:, None].to(tl.int64) * stride_oh
    tl.store(o_rows + dv[None, :], o, mask=head_ok[:, None])
    tl.store(PART_LSE + qi.to(tl.int64) * stride_ln + split * stride_ls + heads, lse2, mask=head_ok)


@triton.jit
def _stage2(PART_O, PART_LSE, OUT, num_splits, stride_on, stride_os, stride_oh, stride_ln, stride_ls,
            stride_outn, stride_outh, DV: tl.constexpr, SPLITS: tl.constexpr):
    qi = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s_all = tl.arange(0, SPLITS)
    lse_all = tl.load(PART_LSE + qi * stride_ln + s_all * stride_ls + head, mask=s_all < num_splits,
                      other=float("-inf"))
    m = tl.max(lse_all, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty query: every weight is 0 and the output 0
    dv = tl.arange(0, DV)
    acc = tl.zeros([DV], tl.float32)
    total = m * 0.0  # a float32 scalar tensor (the loop carries one type)
    for s in range(num_splits):
        w = tl.exp2(tl.load(PART_LSE + qi * stride_ln + s * stride_ls + head) - m)
        acc += w * tl.load(PART_O + qi * stride_on + s * stride_os + head * stride_oh + dv)
        total += w
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + qi * stride_outn + head * stride_outh + dv, out.to(OUT.dtype.element_ty))


def _pow2(name: str, value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two, got {value}")
    return value


def workspace(num_queries: int, num_qo_heads: int, head_dim_v: int, num_splits: int, device):
    """fp32 partial states: ``part_o [n, num_splits, Hq, Dv]``, ``part_lse [n, num_splits, Hq]``."""
    return (torch.empty(num_queries, num_splits, num_qo_heads, head_dim_v, dtype=torch.float32, device=device),
            torch.empty(num_queries, num_splits, num_qo_heads, dtype=torch.float32, device=device))


def default_num_splits(num_queries: int, num_kv_heads: int, group: int, max_kv_len: int, block_n: int,
                       num_sms: int = 132) -> int:
    """Enough (query, head block, split) programs for two waves over ``num_sms``, no split under 4 tiles."""
    programs = num_queries * num_kv_heads * -(-group // BLOCK_H)
    return max(1, min(-(-2 * num_sms // programs), -(-max_kv_len // (4 * block_n)), 64))


def splitkv_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, num_splits: int,
                   sm_scale: float | None = None, rope_dim: int = 0, out=None, part=None, block_n: int = 64,
                   num_warps: int = 4, num_stages: int = 2):
    """Per-branch split-KV decode.

    Args:
        q: ``[n, Hq, D + rope_dim]``; k_cache: ``[pages, page_size, Hkv, D + rope_dim]``;
            v_cache: ``[pages, page_size, Hkv, Dv]`` (may be a view of k_cache); D and Dv powers of two.
        kv_indptr, kv_indices, kv_last_page_len: the CSR page table (int32), as ``treeattn.plan`` takes it.
        num_splits: KV chunks per query; sm_scale: default ``1/sqrt(D + rope_dim)``.
        out: ``[n, Hq, Dv]`` in q's dtype; part: :func:`workspace` of at least ``num_splits`` splits.

    Returns ``out``.
    """
    n, num_qo_heads, q_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    head_dim = _pow2("head_dim", q_dim - rope_dim)
    head_dim_v = _pow2("v_cache.shape[-1]", v_cache.shape[-1])
    if rope_dim:
        _pow2("rope_dim", rope_dim)
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"q: expected num_qo_heads to be a multiple of {num_kv_heads} KV heads, got {num_qo_heads}")
    group = num_qo_heads // num_kv_heads
    head_blocks = -(-group // BLOCK_H)
    out = torch.empty(n, num_qo_heads, head_dim_v, dtype=q.dtype, device=q.device) if out is None else out
    part_o, part_lse = workspace(n, num_qo_heads, head_dim_v, num_splits, q.device) if part is None else part
    if part_o.shape[1] < num_splits:
        raise ValueError(f"part: expected room for {num_splits} splits, got {part_o.shape[1]}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.storage_offset() + sum((n - 1) * st for n, st in zip(cache.shape, cache.stride())) >= 2**31:
            raise ValueError(f"{name}: expected fewer than 2**31 elements (int32 offsets), got {cache.numel()}")
    scale = (1.0 / math.sqrt(q_dim) if sm_scale is None else float(sm_scale)) * LOG2E
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _stage1[(n, num_kv_heads * head_blocks, num_splits)](
        q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, part_o, part_lse,
        scale, page_size, group, head_blocks, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        DK=head_dim, DR=max(rope_dim, 16), HAS_ROPE=rope_dim > 0, DV=head_dim_v, BLOCK_H=BLOCK_H, BLOCK_N=block_n,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    _stage2[(n, num_qo_heads)](
        part_o, part_lse, out, num_splits, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        DV=head_dim_v, SPLITS=triton.next_power_of_2(num_splits), num_warps=4)
    return out
