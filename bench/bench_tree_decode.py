"""GQA tree-decode benchmark over the target workloads (32 q / 8 kv heads, head_dim 128, page 16, bf16).

GPU: kernel µs (CUDA-graph replay, median), GB/s on unique KV bytes, % of the copy bandwidth measured in the
same run, and speedups over per-branch decode (treeattn with sharing off) and torch SDPA on a per-branch
duplicated cache; FlashInfer's tensor-core decode when flashinfer is importable. CPU: the plan (host time
measured) and the bytes each method would read; no kernel timings.

    python bench/bench_tree_decode.py --out bench/results/latest [--sweep]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

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


def byte_model(plan, num_queries: int, kv_dtype_bytes: int = DTYPE_BYTES) -> dict:
    """Bytes each method reads/writes per layer: q/o once, KV per method (``kv_dtype_bytes`` per element: 1
    for an FP8 cache), fp32 partials for treeattn."""
    qo = 2 * num_queries * NUM_QO_HEADS * HEAD_DIM * DTYPE_BYTES
    partial = 2 * plan.stats["partial_rows"] * NUM_QO_HEADS * (HEAD_DIM + 1) * 4
    return {
        "unique_bytes": kv_bytes(plan.stats["unique_tokens"], kv_dtype_bytes) + qo,
        "treeattn_bytes": kv_bytes(plan.stats["planned_tokens"], kv_dtype_bytes) + qo + partial,
        "per_branch_bytes": kv_bytes(plan.stats["naive_tokens"], kv_dtype_bytes) + qo,
    }


def _sdpa_duplicated(q, k_cache, v_cache, table):
    """Per-branch baseline: each query's KV gathered into its own dense copy, then torch SDPA (GQA)."""
    n = table.num_queries
    slots = [table.token_slots(i) for i in range(n)]
    max_len = max(s.numel() for s in slots)
    k_flat = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    v_flat = v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    k = torch.zeros(n, NUM_KV_HEADS, max_len, HEAD_DIM, dtype=q.dtype, device=q.device)
    v = torch.zeros_like(k)
    mask = torch.zeros(n, 1, 1, max_len, dtype=torch.bool, device=q.device)
    for i, s in enumerate(slots):
        k[i, :, : s.numel()] = k_flat[s].transpose(0, 1)
        v[i, :, : s.numel()] = v_flat[s].transpose(0, 1)
        mask[i, ..., : s.numel()] = True
    attn_mask = None if bool(mask.all()) else mask
    q4 = q[:, :, None, :]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, attn_mask=attn_mask, enable_gqa=True)


def _flashinfer_decode(q, k_cache, v_cache, table):
    import flashinfer

    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    wrapper.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, NUM_QO_HEADS, NUM_KV_HEADS,
                 HEAD_DIM, PAGE_SIZE, data_type=q.dtype)
    return lambda: wrapper.run(q, (k_cache, v_cache))


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
        bytes_ = byte_model(shared, n)
        flops = 4 * shared.stats["naive_tokens"] * NUM_QO_HEADS * HEAD_DIM
        row = {"workload": name, "queries": n, **shared.stats, **bytes_, "flops": flops,
               **common.floor_us(bytes_["unique_bytes"], flops, bandwidth_gbs),
               "plan_host_us": plan_host_us(table)}
        out = torch.empty_like(q)
        methods = {
            "treeattn": lambda: treeattn.tree_decode(q, k_cache, v_cache, shared, out=out),
            "treeattn_per_branch": lambda: treeattn.tree_decode(q, k_cache, v_cache, per_branch, out=out),
            "sdpa_duplicated": _sdpa_duplicated(q, k_cache, v_cache, table),
        }
        common.time_methods(row, methods, {"flashinfer_decode_tc": lambda: _flashinfer_decode(q, k_cache, v_cache, table)})
        if sweep:
            sweep_stage1(row, q, k_cache, v_cache, shared, out)
        o_shared = treeattn.tree_decode(q, k_cache, v_cache, shared)
        o_branch = treeattn.tree_decode(q, k_cache, v_cache, per_branch)
        row["rel_err_shared_vs_per_branch"] = relative_error(o_shared, o_branch)
        us = row.get("treeattn_us")
        if us:
            row["treeattn_unique_GBps"] = bytes_["unique_bytes"] / us / 1e3
            row["pct_of_copy_bw"] = 100 * row["treeattn_unique_GBps"] / bandwidth_gbs
            row["x_floor"] = us / row["floor_us"]
            for base in ("treeattn_per_branch", "sdpa_duplicated", "flashinfer_decode_tc"):  # noqa: E501
                if row.get(f"{base}_us"):
                    row[f"speedup_vs_{base}"] = row[f"{base}_us"] / us
        rows.append(row)
        del q, k_cache, v_cache, shared, per_branch, methods
        torch.cuda.empty_cache()
    return rows


def run_cpu(names) -> list[dict]:
    rows = []
    for name in names:
        table = workload_table(name, PAGE_SIZE)
        shared = _plan(table)
        bytes_ = byte_model(shared, table.num_queries)
        rows.append({"workload": name, "queries": table.num_queries, **shared.stats, **bytes_,
                     "flops": 4 * shared.stats["naive_tokens"] * NUM_QO_HEADS * HEAD_DIM,
                     "treeattn_vs_per_branch_bytes": bytes_["per_branch_bytes"] / bytes_["treeattn_bytes"],
                     "treeattn_vs_unique_bytes": bytes_["treeattn_bytes"] / bytes_["unique_bytes"],
                     "plan_host_us": plan_host_us(table)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/latest")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--sweep", action="store_true", help="GPU: also time stage-1 tile configs")
    args = parser.parse_args(argv)
    env = common.environment()
    if torch.cuda.is_available():
        bandwidth = common.copy_bandwidth_gbs()
        rows = run_gpu(args.workloads, bandwidth, args.sweep)
        payload = {"env": env, "copy_bandwidth_GBps": bandwidth, "rows": rows}
        cols = ["workload", "floor_us", "treeattn_us", "x_floor", "treeattn_per_branch_us", "sdpa_duplicated_us",
                "flashinfer_decode_tc_us", "speedup_vs_treeattn_per_branch", "pct_of_copy_bw", "plan_host_us"]
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
