"""Tile configurations of the Triton kernels: the one source of block sizes, warps and stages.

Every launcher asks :func:`tile_config` with the tile it is about to run: kernel, GPU architecture
(``major * 10 + minor``; on CPU, under the Triton interpreter, the default :data:`DEFAULT_ARCH` so the
interpreter runs the tiles the GPU would), head dim and GQA group (padded to the powers of two the tile has),
dtype, and tile rows (queries x heads stacked in the M dimension). The static sm_90a check
(``bench/static_check.py``) records what the launchers ask, so it covers exactly what runs; the GPU tile
sweeps (``bench/bench_tree_decode.py --sweep``, ``bench/bench_mla.py --sweep``) print their winners as rows of
:data:`TABLE` (:func:`format_row`), so a GPU run updates the table by pasting them in.

A row matches a query when each of its key fields is ``None`` (any) or equal; the match with the most
fields given wins, and among those the first. The catch-all rows at the end keep every query answered.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from treeattn import _planner

from ._utils import next_pow2

__all__ = ["TileConfig", "TABLE", "KEY_FIELDS", "DEFAULT_ARCH", "MAX_TILE_ROWS", "MIN_DOT", "Stage1Tile", "dot_width",
           "mla_tile_config", "stage1_tile", "tile_config", "device_arch", "format_row"]

# The GPU the tiles are tuned and statically checked for (H100/H200); CPU runs use its rows.
DEFAULT_ARCH = 90
# Rows (queries x heads) of a stage-1 tile at most: the planner sizes items to this (its one definition is the
# C++ planner's sizing policy), and launchers split larger query blocks into tiles of this many rows.
MAX_TILE_ROWS = _planner.SIZING["target_rows_per_item"]
# tl.dot's smallest operand dimension: narrower tiles are padded up to it.
MIN_DOT = 16
KEY_FIELDS = ("kernel", "arch", "head_dim", "group", "dtype", "rows")


class TileConfig(NamedTuple):
    """Block sizes and launch options of one kernel's tile.

    block_n: KV tokens per tile (stage-1 kernels) or heads per program (``merge_partials``, ``merge_state``).
    num_warps, num_stages: Triton launch options.
    v_split: MLA only: programs that share one tile row's V columns (each computes ``Q·Kᵀ`` and
        ``1/v_split`` of ``P·V``), so that the fp32 accumulator of a 512-wide V fits in registers.
    """

    block_n: int
    num_warps: int
    num_stages: int
    v_split: int = 1


# (kernel, arch, head_dim, group, dtype, rows) -> TileConfig. head_dim/group: padded to powers of two;
# dtype: "fp16" | "bf16" | "fp32" (MLA: the cache's, so also "float8_e4m3fn" | "float8_e5m2"); rows: the
# tile's M (a power of two >= 16).
TABLE: list[tuple[tuple, TileConfig]] = [
    # GQA stage 1 (gqa_decode). Up to 64 rows x 128 columns, 4 warps hold the fp32 accumulator (~185
    # registers, 81 KB shared: 2 blocks per SM); 256 columns need 8 warps (~185 registers) and 32-token tiles.
    (("gqa_decode", None, None, None, None, None), TileConfig(block_n=64, num_warps=4, num_stages=2)),
    (("gqa_decode", None, 256, None, None, None), TileConfig(block_n=32, num_warps=8, num_stages=2)),
    # 64 columns: small tiles, a third stage in flight (at two, ptxas spills a few bytes at 32 rows, bf16).
    (("gqa_decode", None, 64, None, None, None), TileConfig(block_n=64, num_warps=4, num_stages=3)),
    (("gqa_decode", None, None, None, None, 128), TileConfig(block_n=32, num_warps=8, num_stages=2)),
    # MLA stage 1 (mla_decode; head_dim = V's padded width, group = heads padded). 16 rows fit 4 warps; 32
    # and 64 rows take 8 warps (64 x 512 fp32 is 128 registers a thread there). 64 heads of one query stay
    # one program per tile (~248 registers, no Q·Kᵀ recomputed: 128 heads are compute-bound); 64 rows of
    # several queries need more index registers and spill (triton 3.6), so they split V's columns over two
    # programs (~175 registers; each recomputes Q·Kᵀ). 145 KB shared: 1 block per SM either way. The split
    # is keyed by V's width: only a 512-wide accumulator needs it (and a half of V must stay >= MIN_DOT).
    (("mla_decode", None, None, None, None, None), TileConfig(block_n=32, num_warps=8, num_stages=2)),
    (("mla_decode", None, None, None, None, 16), TileConfig(block_n=32, num_warps=4, num_stages=2)),
    (("mla_decode", None, 512, 16, None, 64), TileConfig(block_n=32, num_warps=8, num_stages=2, v_split=2)),
    (("mla_decode", None, 512, 32, None, 64), TileConfig(block_n=32, num_warps=8, num_stages=2, v_split=2)),
    # An FP8 latent cache (the dtype key is the cache's) converts each tile in registers: at 64 heads of one
    # query that alone spills (255 registers, 312-352 B) unless V's columns are split too (~215 registers).
    (("mla_decode", None, 512, None, "float8_e4m3fn", 64),
     TileConfig(block_n=32, num_warps=8, num_stages=2, v_split=2)),
    (("mla_decode", None, 512, None, "float8_e5m2", 64), TileConfig(block_n=32, num_warps=8, num_stages=2, v_split=2)),
    # Stage 2 (merge_partials) and the pairwise merge_state: block_n = heads per program.
    (("merge_partials", None, None, None, None, None), TileConfig(block_n=4, num_warps=4, num_stages=1)),
    (("merge_state", None, None, None, None, None), TileConfig(block_n=4, num_warps=4, num_stages=1)),
]


def dot_width(dim: int) -> int:
    """A tile's width for a ``dim``-wide operand: the next power of two, at least :data:`MIN_DOT`."""
    return max(MIN_DOT, next_pow2(dim))


class Stage1Tile(NamedTuple):
    """Shape of a GQA stage-1 tile: ``block_q`` queries x ``group_pad`` heads (``rows``) by ``head_dim_pad``."""

    block_q: int
    group_pad: int
    head_dim_pad: int
    num_q_blocks: int  # query blocks per item (1 unless the plan was sized for a smaller group)

    @property
    def rows(self) -> int:
        return self.block_q * self.group_pad


def _queries_per_tile(heads_pad: int, max_queries_per_item: int, block_m: int) -> int:
    """Queries stacked under ``heads_pad`` heads in a tile of at most ``block_m`` rows and at least
    :data:`MIN_DOT` (tiny head counts pad the query block)."""
    block_q = min(next_pow2(max(1, max_queries_per_item)), max(1, block_m // heads_pad))
    return max(block_q, MIN_DOT // min(heads_pad, MIN_DOT))


def stage1_tile(group: int, head_dim: int, max_queries_per_item: int) -> Stage1Tile:
    """The GQA stage-1 tile for a group and a plan's largest item. One program holds all of an item's
    queries when the plan sized items for this group (the usual case); a plan sized for a smaller group is
    split into query blocks of at most MAX_TILE_ROWS rows."""
    group_pad = next_pow2(group)
    block_q = _queries_per_tile(group_pad, max_queries_per_item, MAX_TILE_ROWS)
    num_q_blocks = triton.cdiv(max(1, max_queries_per_item), block_q)
    return Stage1Tile(block_q, group_pad, dot_width(head_dim), num_q_blocks)


def mla_tile_config(num_heads: int, max_queries_per_item: int, block_m: int = MAX_TILE_ROWS) -> tuple[int, int]:
    """``(head_block, block_q)`` of the MLA stage-1 M tile: ``head_block`` heads of ``block_q`` queries.

    Heads fill the tile first (up to ``block_m``), then queries of the item; the tile has at least
    :data:`MIN_DOT` rows and every size is a power of two, so it is GPU-legal for any head count.
    """
    head_block = min(next_pow2(num_heads), block_m)
    return head_block, _queries_per_tile(head_block, max_queries_per_item, block_m)


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return dtype
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    return short.get(dtype, str(dtype).removeprefix("torch."))


@functools.cache
def _lookup(key: tuple) -> TileConfig:
    best, best_score = None, -1
    for row_key, config in TABLE:
        if all(want is None or want == got for want, got in zip(row_key, key)):
            score = sum(want is not None for want in row_key)
            if score > best_score:
                best, best_score = config, score
    if best is None:
        raise KeyError(f"kernel: expected one of {sorted({k[0] for k, _ in TABLE})}, got {key[0]!r}")
    return best


def tile_config(kernel: str, arch: int, head_dim: int, group: int, dtype, rows: int) -> TileConfig:
    """The table's config for one tile (see the module docstring for how rows match)."""
    return _lookup((kernel, arch, head_dim, group, _dtype_name(dtype), rows))


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device; :data:`DEFAULT_ARCH` elsewhere (the CPU interpreter)."""
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_ARCH


def format_row(kernel: str, arch: int | None, head_dim: int | None, group: int | None, dtype: str | None,
               rows: int | None, config: TileConfig) -> str:
    """One :data:`TABLE` row as source text (what the tile sweeps print for their winners)."""
    key = (kernel, arch, head_dim, group, dtype, rows)
    fields = ", ".join(f"{name}={value}" for name, value in config._asdict().items()
                       if name != "v_split" or value != 1)
    return f"    ({key!r}, TileConfig({fields})),"
