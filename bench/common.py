"""Shared benchmark machinery: environment record, timing, the floor, and result files.

Timing rules (project-wide): CUDA-graph replay or triton.testing.do_bench, median after warm-up; the KV
working set is larger than L2 (and do_bench flushes L2 between runs); random data; every number is reported
against the floor measured in the same run. On CPU nothing is timed except host-side planning: the kernel
rows report what each method would read.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

BF16_MATMUL_TFLOPS = 675.0  # measured H200 dense bf16 matmul rate (see docs/design.md, targets)


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


def time_methods(row: dict, methods: dict, optional: dict | None = None) -> None:
    """Times every method into ``row["<name>_us"]``. ``optional`` maps a provider name to a zero-argument
    builder that may fail (a peer library that is absent): its failure is recorded as ``<name>_error``,
    as is a method that fails to run, and the others still run."""
    methods = dict(methods)
    for name, build in (optional or {}).items():
        try:
            methods[name] = build()
        except Exception as exc:
            row[f"{name}_error"] = _error(exc)
    for name, fn in methods.items():
        try:
            row[f"{name}_us"] = time_us(fn)
        except Exception as exc:
            row[f"{name}_error"] = _error(exc)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth measured now (read + write bytes / median time), GB/s."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), graph=False)
    del src, dst
    return 2 * num_bytes / us / 1e3


def floor_us(unique_bytes: int, flops: int, bandwidth_gbs: float) -> dict:
    mem = unique_bytes / bandwidth_gbs / 1e3
    comp = flops / BF16_MATMUL_TFLOPS / 1e6
    return {"floor_us": max(mem, comp), "floor_memory_us": mem, "floor_compute_us": comp,
            "bound": "memory" if mem >= comp else "compute"}


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
