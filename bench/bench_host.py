"""Host time of one ``tree_decode`` / ``mla_tree_decode`` call with the Triton launches stubbed out.

A decode step calls each op once per layer, so the Python around the kernels (validation, output
allocation, backend choice, argument packing) is paid 60+ times per step unless the step is graph-captured.
Every ``@triton.jit`` kernel of ``treeattn.triton_kernels`` is replaced by a stub that accepts the launch
and does nothing, so what is timed is treeattn's host path (validation, output allocation, backend choice,
launcher arithmetic) with the Triton backend, on CUDA tensors where a GPU is present, else on CPU tensors
(Triton's CPU interpreter serves those). Target: ≤ 5 µs per call where the plan and argument layout are
unchanged (median of single calls on the 2-core development VM); each row prints it and the summary says by
how much it meets or misses it (nothing asserts a time).

    python bench/bench_host.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton serves CPU tensors (its kernels are stubbed here)

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from summary import target_text  # noqa: E402

import treeattn  # noqa: E402
from treeattn.testing import workload_table  # noqa: E402

TARGET_US = 5.0


class _StubLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_triton_launches():
    """Replaces every Triton kernel object in ``treeattn.triton_kernels``' modules by a no-op launch."""
    import triton

    kernel_types = tuple(
        t for t in (getattr(triton, "JITFunction", None), _interpreted_function_type()) if t is not None
    )
    saved = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("treeattn.triton_kernels."):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, kernel_types):
                saved.append((module, attr, value))
                setattr(module, attr, _StubLaunch())
    try:
        yield len(saved)
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _interpreted_function_type():
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    return InterpretedFunction


def _gqa_case(dtype, device):
    table = workload_table("bestofN_P4k_N64_S256")  # 64 queries sharing a 4k prompt, page 16
    k_cache = torch.zeros(table.num_pages, table.page_size, 8, 128, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    q = torch.zeros(table.num_queries, 32, 128, dtype=dtype, device=device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=table.page_size,
                         num_qo_heads=32, num_kv_heads=8, device=device)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device=device)
    decoder = treeattn.decode.tree_decoder(plan)
    return {
        "tree_decode": lambda: treeattn.tree_decode(q, k_cache, v_cache, plan),
        "tree_decode, out= and lse_out= given": lambda: treeattn.tree_decode(
            q, k_cache, v_cache, plan, out=out, lse_out=lse, return_lse=True),
        "tree_decoder(plan) call (a step's later layers)": lambda: decoder(q, k_cache, v_cache),
    }


def _mla_case(dtype, device):
    table = workload_table("bestofN_P4k_N64_S256", page_size=64)
    kv_cache = torch.zeros(table.num_pages, table.page_size, 576, dtype=dtype, device=device)
    q = torch.zeros(table.num_queries, 16, 576, dtype=dtype, device=device)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=table.page_size,
                         num_qo_heads=16, num_kv_heads=1, device=device)
    out, lse = torch.empty(q.shape[0], 16, 512, dtype=dtype, device=device), torch.empty(q.shape[:2], device=device)
    scale = 192 ** -0.5
    decoder = treeattn.decode.mla_tree_decoder(plan)
    return {
        "mla_tree_decode": lambda: treeattn.mla_tree_decode(q, kv_cache, plan, sm_scale=scale),
        "mla_tree_decode, out= and lse_out= given": lambda: treeattn.mla_tree_decode(
            q, kv_cache, plan, sm_scale=scale, out=out, lse_out=lse, return_lse=True),
        "mla_tree_decoder(plan) call (a step's later layers)": lambda: decoder(q, kv_cache, sm_scale=scale),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    parser.add_argument("--repeats", type=int, default=2001)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if treeattn.backend_for("tree_decode", device) != "triton":
        # treeattn was imported (by another benchmark) before TRITON_INTERPRET was set, and Triton reads it
        # when the kernels are defined: measure in a fresh process.
        subprocess.run([sys.executable, __file__, "--out", args.out, "--repeats", str(args.repeats)],
                       env=dict(os.environ, TRITON_INTERPRET="1"), check=True)
        return
    dtype = torch.float16
    rows = []
    with stubbed_triton_launches() as num_stubs:
        if num_stubs == 0:
            raise RuntimeError("no Triton kernel found to stub: the host path cannot be isolated")
        for case in (_gqa_case(dtype, device), _mla_case(dtype, device)):
            for name, call in case.items():
                rows.append({"case": name, "device": str(device), "host_us": common.host_us(call, args.repeats),
                             "target_us": TARGET_US})
    common.print_table(rows, ["case", "device", "host_us", "target_us"])
    measure = f"host time per call on {device} (kernels stubbed; load average {os.getloadavg()[0]:.1f})"
    summary = [{"case": r["case"], "measure": measure,
                "value": f"{r['host_us']:.1f} µs", "vs": target_text(r["host_us"], TARGET_US)} for r in rows]
    # (a shared machine's load moves host times: it is recorded with them)
    payload = {"env": common.environment(), "load_average": os.getloadavg(), "rows": rows, "summary": summary}
    print(f"wrote {common.write_results(args.out, 'host', payload)}")


if __name__ == "__main__":
    main()
