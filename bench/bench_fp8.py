"""FP8 KV cache next to bf16: bytes per layer, decode accuracy and (GPU) decode time, GQA and MLA.

Rows: the GQA target workloads (32 q / 8 kv heads, head_dim 128, page 16) and MLA best-of-N (16 and 128 heads,
576 / 512, page 64). For each:

- bytes per layer treeattn reads with a bf16 cache and with an FP8 cache (same plan; q/o and the fp32
  partial states do not shrink), from the byte models of ``bench_tree_decode`` / ``bench_mla``;
- accuracy, on the same random data (q, K, V ~ N(0, 1)): decode on the bf16 cache and on FP8 caches
  (``float8_e4m3fn`` / ``float8_e5m2``; GQA per-KV-head scales, MLA one scale) against the fp32 truth, and FP8
  against bf16: the error a user buys with the halved bytes. On a GPU the kernels run (bf16 q) on the full
  workload; on CPU the fp32 reference stands in for them on workloads shrunk by ``--cpu-scale`` (the error is
  the cache format's, not the kernel's: the kernels match the reference on the dequantized cache to fp16
  accuracy, see tests/test_fp8.py);
- GPU only: µs of bf16 and FP8 decode (CUDA-graph replay, median) and the speedup.

    python bench/bench_fp8.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_mla  # noqa: E402
import bench_tree_decode as bench_gqa  # noqa: E402
import common  # noqa: E402

import treeattn  # noqa: E402
from treeattn import reference  # noqa: E402
from treeattn.testing import WORKLOADS, relative_error, workload_table  # noqa: E402

FP8_FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MLA_WORKLOAD = "bestofN_P4k_N64_S256"


def per_head_scale(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale per KV head (dim -2) that maps each head's largest |value| onto the format's largest value."""
    return (values.abs().amax(dim=(0, 1, 3)) / torch.finfo(dtype).max).float()


def tensor_scale(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.abs().amax() / torch.finfo(dtype).max).float()


def _gqa_decoders(table, plan, use_kernels: bool):
    """(decode(q, k, v, k_scale, v_scale)) by the op on a plan, or by the fp32 reference."""
    if use_kernels:
        return lambda q, k, v, ks, vs: treeattn.tree_decode(q, k, v, plan, k_scale=ks, v_scale=vs)
    ptrs = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    return lambda q, k, v, ks, vs: reference.tree_decode(q, k, v, *ptrs, k_scale=ks, v_scale=vs)[0]


def _mla_decoders(table, plan, use_kernels: bool):
    if use_kernels:
        return lambda q, kv, s: treeattn.mla_tree_decode(q, kv, plan, sm_scale=bench_mla.SM_SCALE,
                                                         v_head_dim=bench_mla.KV_LORA, kv_scale=s)
    ptrs = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    return lambda q, kv, s: reference.mla_tree_decode(q, kv, *ptrs, sm_scale=bench_mla.SM_SCALE,
                                                      v_head_dim=bench_mla.KV_LORA, kv_scale=s)[0]


def _errors(row: dict, name: str, out: torch.Tensor, truth: torch.Tensor, bf16_out: torch.Tensor) -> None:
    row[f"{name}_rel_err_vs_fp32"] = relative_error(out, truth)
    row[f"{name}_rel_err_vs_bf16"] = relative_error(out, bf16_out)


def gqa_row(name: str, device, q_dtype, use_kernels: bool, scale: float, time_it: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    full = workload_table(name, bench_gqa.PAGE_SIZE, generator=g)
    full_plan, n = bench_gqa._plan(full), full.num_queries
    row = {"workload": name, "kind": "gqa", "queries": n, "accuracy_tokens_scale": scale,
           "bf16_bytes": bench_gqa.decode_bytes(full_plan), "fp8_bytes": bench_gqa.decode_bytes(full_plan, 1)}
    table = (full if scale == 1.0 else workload_table(name, bench_gqa.PAGE_SIZE, scale=scale, generator=g)).to(device)
    plan = bench_gqa._plan(table)
    shape = (table.num_pages, bench_gqa.PAGE_SIZE, bench_gqa.NUM_KV_HEADS, bench_gqa.HEAD_DIM)
    q = torch.randn(n, bench_gqa.NUM_QO_HEADS, bench_gqa.HEAD_DIM, generator=g).to(device=device, dtype=q_dtype)
    k32 = torch.randn(shape, generator=g).to(device)
    v32 = torch.randn(shape, generator=g).to(device)
    decode = _gqa_decoders(table, plan, use_kernels)
    ptrs = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    truth = reference.tree_decode(q.float(), k32, v32, *ptrs)[0]
    kb, vb = k32.to(torch.bfloat16), v32.to(torch.bfloat16)
    if not use_kernels or q_dtype == torch.bfloat16:
        bf16_out = decode(q, kb, vb, None, None)
    else:  # the CPU interpreter has no bf16: the bf16 cache's values, decoded in q's dtype
        bf16_out = decode(q, kb.to(q_dtype), vb.to(q_dtype), None, None)
    row["bf16_rel_err_vs_fp32"] = relative_error(bf16_out, truth)
    methods = {"bf16": lambda: decode(q, kb, vb, None, None)}
    for fmt, dtype in FP8_FORMATS.items():
        ks, vs = per_head_scale(k32, dtype), per_head_scale(v32, dtype)
        k8, v8 = reference.quantize(k32, ks, dtype), reference.quantize(v32, vs, dtype)
        _errors(row, f"fp8_{fmt}", decode(q, k8, v8, ks, vs), truth, bf16_out)
        methods[f"fp8_{fmt}"] = lambda k8=k8, v8=v8, ks=ks, vs=vs: decode(q, k8, v8, ks, vs)
    if time_it:
        common.time_methods(row, methods)
    return row


def mla_row(num_heads: int, device, q_dtype, use_kernels: bool, scale: float, time_it: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    full = workload_table(MLA_WORKLOAD, bench_mla.PAGE_SIZE, generator=g)
    full_plan = bench_mla._plan(full, num_heads)
    row = {"workload": MLA_WORKLOAD, "kind": "mla", "heads": num_heads, "queries": full.num_queries,
           "accuracy_tokens_scale": scale, "bf16_bytes": bench_mla.decode_bytes(full_plan, num_heads),
           "fp8_bytes": bench_mla.decode_bytes(full_plan, num_heads, 1)}
    table = (full if scale == 1.0 else workload_table(MLA_WORKLOAD, bench_mla.PAGE_SIZE, scale=scale, generator=g))
    table = table.to(device)
    plan = bench_mla._plan(table, num_heads)
    q = torch.randn(table.num_queries, num_heads, bench_mla.HEAD_DIM, generator=g).to(device=device, dtype=q_dtype)
    kv32 = torch.randn(table.num_pages, bench_mla.PAGE_SIZE, bench_mla.HEAD_DIM, generator=g).to(device)
    decode = _mla_decoders(table, plan, use_kernels)
    ptrs = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    truth = reference.mla_tree_decode(q.float(), kv32, *ptrs, sm_scale=bench_mla.SM_SCALE,
                                      v_head_dim=bench_mla.KV_LORA)[0]
    kvb = kv32.to(torch.bfloat16)
    bf16_out = decode(q, kvb if not use_kernels or q_dtype == torch.bfloat16 else kvb.to(q_dtype), None)
    row["bf16_rel_err_vs_fp32"] = relative_error(bf16_out, truth)
    methods = {"bf16": lambda: decode(q, kvb, None)}
    for fmt, dtype in FP8_FORMATS.items():
        s = tensor_scale(kv32, dtype)
        kv8 = reference.quantize(kv32, s, dtype)
        _errors(row, f"fp8_{fmt}", decode(q, kv8, s), truth, bf16_out)
        methods[f"fp8_{fmt}"] = lambda kv8=kv8, s=s: decode(q, kv8, s)
    if time_it:
        common.time_methods(row, methods)
    return row


def summary_lines(rows: list[dict]) -> list[dict]:
    lines = []
    for row in rows:
        case = f"{row['workload']}" + (f", MLA {row['heads']} heads" if row["kind"] == "mla" else ", GQA")
        lines.append({"case": case, "measure": "bytes per layer, FP8 cache (model)",
                      "value": f"{row['fp8_bytes'] / 1e6:.1f} MB",
                      "vs": f"{row['bf16_bytes'] / row['fp8_bytes']:.2f}× fewer than bf16 "
                            f"({row['bf16_bytes'] / 1e6:.1f} MB)"})
        for fmt in FP8_FORMATS:
            where = "kernels" if row.get("bf16_us") or row.get("bf16_error") else "reference"
            lines.append({
                "case": f"{case}, {fmt}", "measure": f"decode rel. error vs fp32 ({where})",
                "value": f"{row[f'fp8_{fmt}_rel_err_vs_fp32']:.2e}",
                "vs": f"bf16 cache {row['bf16_rel_err_vs_fp32']:.2e}; "
                      f"FP8 vs bf16 {row[f'fp8_{fmt}_rel_err_vs_bf16']:.2e}",
            })
            us, base = row.get(f"fp8_{fmt}_us"), row.get("bf16_us")
            if us and base:
                lines.append({"case": f"{case}, {fmt}", "measure": "decode µs (GPU)", "value": f"{us:.1f} µs",
                              "vs": f"{base / us:.2f}× faster than bf16 ({base:.1f} µs)"})
    return lines


def run(device, q_dtype, use_kernels: bool, scale: float, time_it: bool, workloads) -> list[dict]:
    rows = [gqa_row(name, device, q_dtype, use_kernels, scale, time_it) for name in workloads]
    rows += [mla_row(h, device, q_dtype, use_kernels, scale, time_it) for h in bench_mla.HEAD_COUNTS]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--cpu-scale", type=float, default=1 / 16,
                        help="CPU: shrink every tree level's tokens by this factor for the accuracy rows")
    args = parser.parse_args(argv)
    env = common.environment()
    if torch.cuda.is_available():
        rows = run(torch.device("cuda"), torch.bfloat16, True, 1.0, True, args.workloads)
        note = "GPU: kernels (bf16 q), full workloads"
    else:
        rows = run(torch.device("cpu"), torch.float32, False, args.cpu_scale, False, args.workloads)
        note = (f"CPU: bytes from the byte model on the full workloads' plans; accuracy from the fp32 reference on "
                f"bf16 / FP8 caches, workloads shrunk to {args.cpu_scale:g} of their tokens; no timings")
    payload = {"env": env, "note": note, "rows": rows, "summary": summary_lines(rows)}
    cols = ["workload", "kind", "heads", "bf16_bytes", "fp8_bytes", "bf16_rel_err_vs_fp32",
            "fp8_e4m3fn_rel_err_vs_fp32", "fp8_e4m3fn_rel_err_vs_bf16", "fp8_e5m2_rel_err_vs_fp32",
            "bf16_us", "fp8_e4m3fn_us", "fp8_e5m2_us"]
    common.print_table(rows, cols)
    path = common.write_results(args.out, "fp8", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
