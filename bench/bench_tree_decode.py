"""GQA tree-decode benchmark over the target workloads (32 q / 8 kv heads, head_dim 128, page 16, bf16).

GPU: kernel µs (CUDA-graph replay, median), GB/s on unique KV bytes, % of the copy bandwidth measured in the
same run, the speedup over per-branch decode (treeattn with sharing off) and, on the same tables, caches and
queries, every GQA peer of ``peers.py`` (FlashInfer decode and cascade when importable, split-KV Triton,
SDPA on a duplicated cache, flex_attention) with the best of them. CPU: the plan (host time measured) and
the bytes each method would read; no kernel timings, the peers recorded as skipped.

    python bench/bench_tree_decode.py --out bench/results/local/latest [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import peers  # noqa: E402

import treeattn  # noqa: E402
from treeattn.testing import WORKLOADS, relative_error, workload_table  # noqa: E402

NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
DTYPE_BYTES = 2
# --sweep: stage-1 tile configs (block_n, warps, stages) timed on the GPU.
SWEEP = [(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


def _plan(table, **kw):
    return treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=PAGE_SIZE,
                         num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS, **kw)


def plan_host_us(table, repeats: int = 7, **kw) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _plan(table, **kw)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def kv_bytes(tokens: int, kv_dtype_bytes: int = DTYPE_BYTES) -> int:
    return tokens * NUM_KV_HEADS * HEAD_DIM * 2 * kv_dtype_bytes  # K and V


def qo_bytes(num_queries: int) -> int:
    return 2 * num_queries * NUM_QO_HEADS * HEAD_DIM * DTYPE_BYTES  # q read, o written


def decode_bytes(plan, kv_dtype_bytes: int = DTYPE_BYTES) -> int:
    """Bytes a decode under ``plan`` moves per layer (``kv_dtype_bytes`` per KV element: 1 for an FP8 cache)."""
    return common.decode_bytes(plan, kv_bytes(1, kv_dtype_bytes), qo_bytes(plan.num_queries),
                               NUM_QO_HEADS * (HEAD_DIM + 1) * 4)


def byte_model(plan, per_branch, kv_dtype_bytes: int = DTYPE_BYTES) -> dict:
    """Bytes per layer: the unique KV (the floor) and, like for like, treeattn under ``plan`` and per-branch
    split-KV decode under ``per_branch`` (the same table planned with ``share_prefixes=False``), each with
    the fp32 partial states it writes and merges."""
    return {
        "unique_bytes": kv_bytes(plan.stats["unique_tokens"], kv_dtype_bytes) + qo_bytes(plan.num_queries),
        "treeattn_bytes": decode_bytes(plan, kv_dtype_bytes),
        "per_branch_bytes": decode_bytes(per_branch, kv_dtype_bytes),
    }


def _stage1_config_fn(q, k_cache, v_cache, plan, out, config):
    """The Triton path (stage 1 + merge) with one stage-1 tile config, bypassing dispatch."""
    from treeattn import triton_kernels as tk

    block_n, warps, stages = config
    part_o, part_lse = plan.workspace(NUM_QO_HEADS, HEAD_DIM)
    lse = torch.empty(q.shape[0], NUM_QO_HEADS, device=q.device)

    def run():
        tk.tree_decode(q, k_cache, v_cache, plan, out, lse, part_o, part_lse, HEAD_DIM ** -0.5,
                       block_n=block_n, num_warps=warps, num_stages=stages)

    return run


def sweep_stage1(row, q, k_cache, v_cache, plan, out) -> None:
    """Times every SWEEP config into ``row["sweep_us"]`` and the fastest into ``row["sweep_best"]``."""
    timings = {}
    for config in SWEEP:
        common.time_methods(timings, {str(config): _stage1_config_fn(q, k_cache, v_cache, plan, out, config)})
    row["sweep_us"] = {k[:-3]: v for k, v in timings.items() if k.endswith("_us")}
    row["sweep_errors"] = {k[:-6]: v for k, v in timings.items() if k.endswith("_error")}
    if row["sweep_us"]:
        best = min(row["sweep_us"], key=row["sweep_us"].get)
        row["sweep_best"] = {"block_n_warps_stages": best, "us": row["sweep_us"][best]}
        # The winner as a row of the tile table (triton_kernels/configs.py), ready to paste in.
        from treeattn.triton_kernels.configs import TileConfig, device_arch, format_row
        from treeattn.triton_kernels.gqa_decode import stage1_tile

        tile = stage1_tile(NUM_QO_HEADS // NUM_KV_HEADS, HEAD_DIM, plan.max_queries_per_item)
        config = TileConfig(*next(c for c in SWEEP if str(c) == best))
        row["sweep_best"]["table_row"] = format_row(
            "gqa_decode", device_arch(q.device), tile.head_dim_pad, tile.group_pad, "bf16", tile.rows, config)
        print(row["sweep_best"]["table_row"])


def _case(table, q, k_cache, v_cache, name: str) -> peers.Case:
    return peers.Case(q, k_cache, v_cache, table, HEAD_DIM ** -0.5, fanout=WORKLOADS[name][1])


def run_gpu(names, bandwidth_gbs, sweep: bool = False) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for name in names:
        table = workload_table(name, PAGE_SIZE).to(device)
        n = table.num_queries
        q = torch.randn(n, NUM_QO_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        k_cache = torch.randn(table.num_pages, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        shared = _plan(table)
        per_branch = _plan(table, share_prefixes=False)
        bytes_ = byte_model(shared, per_branch)
        flops = 4 * shared.stats["naive_tokens"] * NUM_QO_HEADS * HEAD_DIM
        row = {"workload": name, "queries": n, **shared.stats, **bytes_, "flops": flops,
               **common.floor_us(bytes_["unique_bytes"], flops, bandwidth_gbs),
               "plan_host_us": plan_host_us(table)}
        out = torch.empty_like(q)
        methods = {
            "treeattn": functools.partial(treeattn.tree_decode, q, k_cache, v_cache, shared, out=out),
            "treeattn_per_branch": functools.partial(treeattn.tree_decode, q, k_cache, v_cache, per_branch, out=out),
        }
        common.time_methods(row, methods)
        if sweep:
            sweep_stage1(row, q, k_cache, v_cache, shared, out)
        o_shared = treeattn.tree_decode(q, k_cache, v_cache, shared)
        o_branch = treeattn.tree_decode(q, k_cache, v_cache, per_branch)
        row["rel_err_shared_vs_per_branch"] = relative_error(o_shared, o_branch)
        peers.time_peers(row, _case(table, q, k_cache, v_cache, name), peers.GQA_PEERS, reference=o_shared)
        us = row.get("treeattn_us")
        if us:
            row["treeattn_unique_GBps"] = bytes_["unique_bytes"] / us / 1e3
            row["pct_of_copy_bw"] = 100 * row["treeattn_unique_GBps"] / bandwidth_gbs
            row["x_floor"] = us / row["floor_us"]
            if row.get("treeattn_per_branch_us"):
                row["speedup_vs_treeattn_per_branch"] = row["treeattn_per_branch_us"] / us
        rows.append(row)
        del q, k_cache, v_cache, shared, per_branch, methods
        torch.cuda.empty_cache()
    return rows


def run_cpu(names) -> list[dict]:
    rows = []
    for name in names:
        table = workload_table(name, PAGE_SIZE)
        shared = _plan(table)
        bytes_ = byte_model(shared, _plan(table, share_prefixes=False))
        row = {"workload": name, "queries": table.num_queries, **shared.stats, **bytes_,
               "flops": 4 * shared.stats["naive_tokens"] * NUM_QO_HEADS * HEAD_DIM,
               "treeattn_vs_per_branch_bytes": bytes_["per_branch_bytes"] / bytes_["treeattn_bytes"],
               "treeattn_vs_unique_bytes": bytes_["treeattn_bytes"] / bytes_["unique_bytes"],
               "plan_host_us": plan_host_us(table)}
        peers.skip_all(row, peers.GQA_PEERS)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--sweep", action="store_true", help="GPU: also time stage-1 tile configs")
    args = parser.parse_args(argv)
    env = {**common.environment(), "peers": peers.versions()}
    if torch.cuda.is_available():
        bandwidth = common.copy_bandwidth_gbs()
        rows = run_gpu(args.workloads, bandwidth, args.sweep)
        payload = {"env": env, "copy_bandwidth_GBps": bandwidth, "rows": rows}
        cols = ["workload", "floor_us", "treeattn_us", "x_floor", "treeattn_per_branch_us", "best_peer",
                "speedup_vs_best_peer", "pct_of_copy_bw", "plan_host_us"]
    else:
        rows = run_cpu(args.workloads)
        payload = {"env": env, "note": "CPU: no kernel timings; bytes each method would read", "rows": rows}
        cols = ["workload", "queries", "unique_tokens", "planned_tokens", "naive_tokens", "work_items",
                "treeattn_vs_per_branch_bytes", "treeattn_vs_unique_bytes", "plan_host_us"]
    common.print_table(rows, cols)
    path = common.write_results(args.out, "tree_decode", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
