"""MLA tree-decode benchmark: DeepSeek-V3 absorbed shapes (q 576, V 512,
latent cache [pages, 64, 576], bf16), 16 and 128 heads.

Rows: bestofN_P4k_N64_S256 (prompt 4096 shared by 64 branches of 256) and plain MLA decode without sharing
(batch 128 x 4096 context). GPU: kernel µs (CUDA-graph replay, do_bench median after warm-up), GB/s on unique KV
bytes, TFLOP/s, x the floor = max(unique bytes / copy bandwidth measured in this run, FLOPs / 675 TFLOP/s);
treeattn with sharing off (per-branch split-KV decode through the same kernel) and the MLA peers of
``peers.py`` (FlashInfer's MLA wrapper when importable, a split-KV Triton decode) on the same caches.
``--sweep`` also times stage-1 tile configs (block_m, block_n, warps, stages).
CPU: the plans, the stage-1 tiling, and the bytes and FLOPs each method would read/do; no timings, the peers
recorded as skipped.

    python bench/bench_mla.py --out bench/results/local/latest [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import peers  # noqa: E402

import treeattn  # noqa: E402
from treeattn.testing import PagedTable, relative_error, tree_table, workload_table  # noqa: E402

KV_LORA, ROPE = 512, 64
HEAD_DIM = KV_LORA + ROPE
PAGE_SIZE = 64
DTYPE_BYTES = 2
SM_SCALE = 192 ** -0.5  # DeepSeek-V3: 1/sqrt(qk_nope 128 + qk_rope 64), mscale 1 here
HEAD_COUNTS = (16, 128)
# name -> table builder (page size 64, shuffled page ids)
ROWS = {
    "bestofN_P4k_N64_S256": lambda g: workload_table("bestofN_P4k_N64_S256", PAGE_SIZE, generator=g),
    "plain_B128_L4k": lambda g: tree_table([4096], [128], PAGE_SIZE, generator=g),  # no sharing
}
SWEEP = [(bm, bn, w, s, vs) for bm in (16, 32, 64) for bn in (16, 32, 64) for w in (4, 8) for s in (1, 2)
         for vs in (1, 2)]


def _plan(table: PagedTable, num_heads: int, **kw):
    return treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=PAGE_SIZE,
                         num_qo_heads=num_heads, num_kv_heads=1, **kw)


def flops(plan, num_heads: int) -> int:
    """Absorbed MLA: per (query, head, KV token) a 576-wide q·k and a 512-wide p·v, 2 FLOPs per MAC."""
    return 2 * plan.stats["naive_tokens"] * num_heads * (HEAD_DIM + KV_LORA)


def qo_bytes(num_queries: int, num_heads: int) -> int:
    return num_queries * num_heads * (HEAD_DIM + KV_LORA) * DTYPE_BYTES  # q (576) read, o (512) written


def decode_bytes(plan, num_heads: int, kv_dtype_bytes: int = DTYPE_BYTES) -> int:
    """Bytes a decode under ``plan`` moves per layer (``kv_dtype_bytes`` per latent element: 1 for an FP8
    cache)."""
    return common.decode_bytes(plan, HEAD_DIM * kv_dtype_bytes, qo_bytes(plan.num_queries, num_heads),
                               num_heads * (KV_LORA + 1) * 4)


def byte_model(plan, per_branch, num_heads: int, kv_dtype_bytes: int = DTYPE_BYTES) -> dict:
    """Bytes per layer: the unique latent KV (the floor) and, like for like, treeattn under ``plan`` and
    per-branch split-KV decode under ``per_branch`` (``share_prefixes=False``), each with the fp32 partial
    states it writes and merges."""
    return {
        "unique_bytes": plan.stats["unique_tokens"] * HEAD_DIM * kv_dtype_bytes
        + qo_bytes(plan.num_queries, num_heads),
        "treeattn_bytes": decode_bytes(plan, num_heads, kv_dtype_bytes),
        "per_branch_bytes": decode_bytes(per_branch, num_heads, kv_dtype_bytes),
    }


def tiling(plan, num_heads: int, block_m: int = 64) -> dict:
    from treeattn.triton_kernels.mla_decode import mla_tile_config

    head_block, block_q = mla_tile_config(num_heads, plan.max_queries_per_item, block_m)
    q_blocks = -(-max(1, plan.max_queries_per_item) // block_q)
    head_blocks = -(-num_heads // head_block)
    return {"tile_rows": head_block * block_q, "tile_heads": head_block, "tile_queries": block_q,
            "stage1_programs": plan.num_items * q_blocks * head_blocks}


def _row(name: str, table: PagedTable, num_heads: int, plan) -> dict:
    per_branch = _plan(table, num_heads, share_prefixes=False)
    bytes_ = byte_model(plan, per_branch, num_heads)
    return {"workload": name, "heads": num_heads, "queries": table.num_queries, **plan.stats, **bytes_,
            "flops": flops(plan, num_heads), **tiling(plan, num_heads),
            "per_branch_work_items": per_branch.stats["work_items"],
            "treeattn_vs_per_branch_bytes": bytes_["per_branch_bytes"] / bytes_["treeattn_bytes"],
            "treeattn_vs_unique_bytes": bytes_["treeattn_bytes"] / bytes_["unique_bytes"]}, per_branch


def _stage1_config_fn(q, kv_cache, plan, out, lse, config):
    """The Triton path (stage 1 + shared merge) with one stage-1 tile config, bypassing dispatch."""
    from treeattn import triton_kernels as tk

    block_m, block_n, warps, stages, v_split = config
    part_o, part_lse = plan.workspace(q.shape[1], KV_LORA)

    def run():
        tk.mla_tree_decode(q, kv_cache, plan, out, lse, part_o, part_lse, SM_SCALE, block_m=block_m,
                           block_n=block_n, num_warps=warps, num_stages=stages, v_split=v_split)

    return run


def _table_row(plan, num_heads: int, config, device) -> str:
    """A sweep winner as a row of the tile table (triton_kernels/configs.py), ready to paste in. (A winning
    block_m below the default caps the tile rows; the row keys on the rows it ran.)"""
    from treeattn.triton_kernels._utils import next_pow2
    from treeattn.triton_kernels.configs import TileConfig, device_arch, format_row
    from treeattn.triton_kernels.mla_decode import mla_tile_config

    block_m, block_n, warps, stages, v_split = config
    head_block, block_q = mla_tile_config(num_heads, plan.max_queries_per_item, block_m)
    return format_row("mla_decode", device_arch(device), next_pow2(KV_LORA), next_pow2(num_heads), "bf16",
                      head_block * block_q, TileConfig(block_n, warps, stages, v_split))


def run_gpu(bandwidth_gbs: float, sweep: bool, device: str = "cuda") -> list[dict]:
    device = torch.device(device)
    rows = []
    for name, build in ROWS.items():
        table = build(torch.Generator().manual_seed(0)).to(device)
        kv_cache = torch.randn(table.num_pages, PAGE_SIZE, HEAD_DIM, device=device, dtype=torch.bfloat16)
        for num_heads in HEAD_COUNTS:
            shared = _plan(table, num_heads)
            row, per_branch = _row(name, table, num_heads, shared)
            row.update(common.floor_us(row["unique_bytes"], row["flops"], bandwidth_gbs))
            q = torch.randn(table.num_queries, num_heads, HEAD_DIM, device=device, dtype=torch.bfloat16)
            out = q.new_empty(table.num_queries, num_heads, KV_LORA)
            lse = torch.empty(table.num_queries, num_heads, device=device)
            methods = {
                "treeattn": functools.partial(treeattn.mla_tree_decode, q, kv_cache, shared, sm_scale=SM_SCALE,
                                              out=out, lse_out=lse),
                "treeattn_per_branch": functools.partial(treeattn.mla_tree_decode, q, kv_cache, per_branch,
                                                         sm_scale=SM_SCALE, out=out, lse_out=lse),
            }
            common.time_methods(row, methods)
            if sweep:
                best = None
                for config in SWEEP:
                    try:
                        us = common.time_us(_stage1_config_fn(q, kv_cache, shared, out, lse, config))
                    except Exception as exc:
                        row.setdefault("sweep_errors", {})[str(config)] = f"{type(exc).__name__}: {exc}"[:120]
                        continue
                    row.setdefault("sweep_us", {})[str(config)] = us
                    if best is None or us < best[1]:
                        best = (config, us)
                if best:
                    row["sweep_best"] = {"block_m_n_warps_stages_vsplit": best[0], "us": best[1]}
                    row["sweep_best"]["table_row"] = _table_row(shared, num_heads, best[0], device)
                    print(row["sweep_best"]["table_row"])
            o_shared = treeattn.mla_tree_decode(q, kv_cache, shared, sm_scale=SM_SCALE)
            o_branch = treeattn.mla_tree_decode(q, kv_cache, per_branch, sm_scale=SM_SCALE)
            row["rel_err_shared_vs_per_branch"] = relative_error(o_shared, o_branch)
            peers.time_peers(row, peers.Case(q, kv_cache, None, table, SM_SCALE, rope_dim=ROPE), peers.MLA_PEERS,
                             reference=o_shared)
            us = row.get("treeattn_us")
            if us:
                row["treeattn_unique_GBps"] = row["unique_bytes"] / us / 1e3
                row["treeattn_TFLOPs"] = row["flops"] / us / 1e6
                row["x_floor"] = us / row["floor_us"]
                if row.get("treeattn_per_branch_us"):
                    row["speedup_vs_treeattn_per_branch"] = row["treeattn_per_branch_us"] / us
            rows.append(row)
            del q, out, lse, shared, per_branch, methods
            torch.cuda.empty_cache()
        del kv_cache
    return rows


def run_cpu() -> list[dict]:
    rows = []
    for name, build in ROWS.items():
        table = build(torch.Generator().manual_seed(0))
        for num_heads in HEAD_COUNTS:
            row, _ = _row(name, table, num_heads, _plan(table, num_heads))
            row["floor_compute_us_at_675TFLOPs"] = row["flops"] / common.BF16_MATMUL_TFLOPS / 1e6
            peers.skip_all(row, peers.MLA_PEERS)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    parser.add_argument("--sweep", action="store_true", help="GPU: also time stage-1 tile configs")
    args = parser.parse_args(argv)
    env = {**common.environment(), "peers": peers.versions()}
    if torch.cuda.is_available():
        bandwidth = common.copy_bandwidth_gbs()
        rows = run_gpu(bandwidth, args.sweep)
        payload = {"env": env, "copy_bandwidth_GBps": bandwidth, "sm_scale": SM_SCALE, "rows": rows}
        cols = ["workload", "heads", "floor_us", "bound", "treeattn_us", "x_floor", "treeattn_TFLOPs",
                "treeattn_unique_GBps", "treeattn_per_branch_us", "best_peer", "speedup_vs_best_peer"]
    else:
        rows = run_cpu()
        payload = {"env": env, "note": "CPU: no kernel timings; plans, tiling, bytes and FLOPs per method",
                   "rows": rows}
        cols = ["workload", "heads", "queries", "unique_tokens", "planned_tokens", "naive_tokens", "work_items",
                "tile_rows", "stage1_programs", "treeattn_vs_per_branch_bytes", "treeattn_vs_unique_bytes",
                "floor_compute_us_at_675TFLOPs"]
    common.print_table(rows, cols)
    path = common.write_results(args.out, "mla", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
