"""The softmax arithmetic every attention kernel of the package shares, as ``@triton.jit`` helpers that the
kernels inline.

An attention state over a KV set is ``(acc, l, m)``: ``acc`` the unnormalized output ``[rows, cols]``
(fp32), ``l`` the sum of the weights ``[rows]`` and ``m`` the largest score ``[rows]``; the output is
``acc / l`` and the log-sum-exp ``m + log(l)``. Stage 1 builds a state one KV tile at a time with scores in
the exp2 domain (:func:`online_softmax_tile`, the Triton tutorial's inner step); the merges fold finished
states ``(o, lse)`` (natural log) into a running one (:func:`fold_state`). Both end in :func:`normalize`.

Empty and poisoned states follow one rule everywhere: a state with no KV has ``l == 0`` and ``m == -inf``,
and gives ``o = 0``, ``lse = -inf``; a NaN anywhere makes ``l`` NaN, which must reach the output (a NaN
compares False to everything, so the guards test for emptiness, never for ``l > 0``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._utils import LN2 as _LN2

__all__ = [
    "LN2", "fold_state", "head_block", "load_state", "normalize", "online_softmax_tile", "softmax_state",
    "static_assert_dot_size", "store_merged",
]

LN2 = tl.constexpr(_LN2)  # log2 -> natural log of the stage-1 lse


@triton.jit
def static_assert_dot_size(SIZE: tl.constexpr):
    """A tile dimension that reaches ``tl.dot`` (or an arange) is a power of two and, for tl.dot, >= 16."""
    tl.static_assert(SIZE >= 16, "tile: tl.dot needs 16 or more rows and columns")
    tl.static_assert((SIZE & (SIZE - 1)) == 0, "tile: sizes are powers of two")


@triton.jit
def softmax_state(ROWS: tl.constexpr, COLS: tl.constexpr):
    """``(acc, l, m)`` of an empty state: zeros ``[ROWS, COLS]``, zeros ``[ROWS]``, ``-inf`` ``[ROWS]``."""
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    return acc, l_i, m_i


@triton.jit
def online_softmax_tile(acc, l_i, m_i, scores, valid, v, DOT_PRECISION: tl.constexpr):
    """One KV tile into the state: ``scores`` ``[rows, BLOCK_N]`` are log2-domain logits, ``valid``
    ``[BLOCK_N]`` the tile's real tokens (at least one: ``m`` is finite after every tile) and ``v``
    ``[BLOCK_N, cols]`` the tile's values, in the dtype ``tl.dot`` takes. Returns ``(acc, l, m)``."""
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def fold_state(acc, l_run, m_run, o, lse):
    """A finished state (``o`` fp32 ``[rows, cols]``, ``lse`` ``[rows]``, natural log) into a running one with
    ``m`` in the natural-log domain. Returns ``(acc, l, m)``. The larger lse is the reference, so every
    exponent is <= 0; a state with no KV (``lse = -inf``) adds nothing, whatever its ``o`` holds."""
    m_new = tl.maximum(m_run, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_run - m_safe)
    w = tl.exp(lse - m_safe)
    acc = acc * alpha[:, None] + tl.where(w[:, None] == 0, 0.0, o * w[:, None])
    return acc, l_run * alpha + w, m_new


@triton.jit
def head_block(num_heads, HEAD_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """``(h, h_valid, d, mask)`` of a merge program's tile: heads block ``program_id(1)`` of ``num_heads``
    (``[HEAD_BLOCK]``), the columns (``[HEAD_DIM_PAD]``) and the tile's mask (``[HEAD_BLOCK, HEAD_DIM_PAD]``)."""
    h = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    h_valid = h < num_heads
    d = tl.arange(0, HEAD_DIM_PAD)
    return h, h_valid, d, h_valid[:, None] & (d < HEAD_DIM)[None, :]


@triton.jit
def load_state(o_ptr, lse_ptr, row, stride_n, stride_h, stride_lse_n, h, h_valid, d, mask):
    """A finished state's heads ``h`` of row ``row`` (int64): ``(o [heads, cols] fp32, lse [heads])``;
    masked heads read as an empty state (lse ``-inf``), never from memory."""
    lse = tl.load(lse_ptr + row * stride_lse_n + h, mask=h_valid, other=float("-inf"))
    o = tl.load(o_ptr + row * stride_n + h[:, None] * stride_h + d[None, :], mask=mask, other=0.0)
    return o.to(tl.float32), lse


@triton.jit
def store_merged(acc, l_i, m_i, out_ptr, lse_ptr, row, stride_out_n, stride_out_h, stride_lse_n, h, h_valid, d, mask):
    """Stores a merged state (``m`` natural log) as output row ``row`` (int64): ``o`` in ``out``'s dtype and
    the lse (:func:`normalize`'s rule for empty and NaN rows)."""
    o, l_safe = normalize(acc, l_i)
    tl.store(out_ptr + row * stride_out_n + h[:, None] * stride_out_h + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(lse_ptr + row * stride_lse_n + h, m_i + tl.log(l_safe), mask=h_valid)


@triton.jit
def normalize(acc, l_i):
    """``(acc / l, l_safe)``: the output of a state, 0 for an empty row (``l == 0``), NaN kept; ``l_safe``
    (1 where ``l == 0``) gives the lse as ``m + log(l_safe)``: ``-inf`` for an empty row (``m = -inf``)."""
    l_safe = tl.where(l_i == 0, 1.0, l_i)
    return acc / l_safe[:, None], l_safe
