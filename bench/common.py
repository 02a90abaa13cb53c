"""Shared benchmark machinery: environment record, timing, the floor, and result files.

Timing rules (project-wide): CUDA-graph replay or triton.testing.do_bench, median after warm-up; the KV
working set is larger than L2 (and do_bench flushes L2 between runs); random data; every number is reported
against the floor measured in the same run. On CPU nothing is timed except host-side planning: the kernel
rows report what each method would read.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

BF16_MATMUL_TFLOPS = 675.0  # measured H200 dense bf16 matmul rate (see docs/design.md, targets)


def cli_description(doc: str) -> str:
    """A script's ``--help`` description: the first paragraph of its docstring, whole."""
    return " ".join(doc.split("\n\n")[0].split())


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["commit"] = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True, stderr=subprocess.DEVNULL
        ).strip()
        # The suite's own output (bench/results/) does not make the checkout dirty.
        status = subprocess.check_output(["git", "status", "--porcelain", "--", ":/", ":(exclude,top)bench/results"],
                                         cwd=Path(__file__).parent, text=True)
        env["dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def time_us(fn, *, graph: bool = True) -> float:
    """Median µs of ``fn()`` on the GPU: captured in a CUDA graph and replayed (no launch overhead) when
    ``graph``, else launched eagerly; do_bench warms up and flushes L2 between repetitions."""
    import triton.testing

    fn()  # compile / allocate outside the graph
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    return 1e3 * triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")


def host_us(fn, repeats: int, before=None) -> float:
    """Median µs of host-side ``fn()`` (wall clock) over ``repeats`` calls after one warm-up call; ``before()``,
    when given, runs untimed before each timed call."""
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def time_methods(row: dict, methods: dict) -> None:
    """Times every method into ``row["<name>_us"]``; one that fails to run gets ``row["<name>_error"]`` and the
    others still run."""
    for name, fn in methods.items():
        try:
            row[f"{name}_us"] = time_us(fn)
        except Exception as exc:
            row[f"{name}_error"] = error_text(exc)


def error_text(exc: Exception) -> str:
    """An exception as one short line for the results."""
    return f"{type(exc).__name__}: {exc}"[:200]


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth measured now (read + write bytes / median time), GB/s."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(functools.partial(dst.copy_, src), graph=False)
    del src, dst
    return 2 * num_bytes / us / 1e3


def floor_us(unique_bytes: int, flops: int, bandwidth_gbs: float) -> dict:
    mem = unique_bytes / bandwidth_gbs / 1e3
    comp = flops / BF16_MATMUL_TFLOPS / 1e6
    return {"floor_us": max(mem, comp), "floor_memory_us": mem, "floor_compute_us": comp,
            "bound": "memory" if mem >= comp else "compute"}


def decode_bytes(plan, kv_token_bytes: int, qo_bytes: int, partial_row_bytes: int) -> int:
    """Bytes one split-KV decode under ``plan`` moves per layer (the byte model): the KV tokens its stage 1
    reads (``planned_tokens``), q and o once, and the fp32 partial states it writes and its merge reads back
    (``partial_rows``). A per-branch plan (``share_prefixes=False``) charges per-branch split-KV decode the
    same way, so a table without sharing moves the same bytes either way."""
    s = plan.stats
    return s["planned_tokens"] * kv_token_bytes + qo_bytes + 2 * s["partial_rows"] * partial_row_bytes


def write_results(out_dir: str | os.PathLike, name: str, payload: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns} if rows else {}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "" if v is None else str(v)
