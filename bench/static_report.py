"""The static check's report: the table printed for a reader (one row per distinct launch, readable kernel
names) and the lines of the benchmark suite's summary."""

from __future__ import annotations

_SHORT = {"GROUP": "G", "GROUP_PAD": "Gp", "BLOCK_Q": "BQ", "HEAD_DIM": "D", "HEAD_DIM_PAD": "Dp", "PAGE_SIZE": "P",
          "BLOCK_N": "BN", "DOT_PRECISION": "", "HEAD_BLOCK": "HB"}


def _describe(spec: dict) -> str:
    parts = []
    for name, value in spec["constexprs"].items():
        if name == "DOT_PRECISION" or value is None:
            continue
        parts.append(f"{_SHORT.get(name, name)}={value}")
    return " ".join(parts)


def _dtype(spec: dict) -> str:
    for sig in spec["signature"].values():
        if sig.startswith("*") and sig[1:] in ("fp16", "bf16", "fp32", "fp8e4nv", "fp8e5"):
            return sig[1:]
    return "-"


def _flag(violations: list[str]) -> str:
    return ("  FAIL " + "; ".join(violations)) if violations else ""


def _kernel_column(names: list[str]) -> tuple[int, str]:
    """Width of the kernel column (the longest name: names are never cut) and its header."""
    width = max([len("kernel")] + [len(n) for n in names])
    return width, f"{'kernel':<{width}}"


def format_table(entries: list[dict], cuda_rows: list[dict]) -> str:
    """One row per distinct Triton launch (kernel, dtype, warps/stages, registers, spill bytes, shared KB,
    blocks per SM, cases, constexprs), then the CUDA extension's kernels by their demangled names."""
    names = [e["spec"]["kernel"].split(":")[1] for e in entries] + ["_C " + r["name"] for r in cuda_rows]
    width, header = _kernel_column(names)
    lines = [f"{header} {'dtype':<5} {'w/s':<5} {'regs':>4} {'spill':>5} {'smemKB':>6} {'blk/SM':>6} "
             f"{'cases':>5}  constexprs / problems"]
    for kernel, e in zip(names, entries):
        ws = f"{e['spec']['options'].get('num_warps', 4)}/{e['spec']['options'].get('num_stages', 3)}"
        if e["error"] is not None:
            lines.append(f"{kernel:<{width}} {_dtype(e['spec']):<5} {ws:<5} {'-':>4} {'-':>5} {'-':>6} {'-':>6} "
                         f"{len(e['cases']):>5}  {_describe(e['spec'])}  FAIL {e['violations'][0]}")
            continue
        lines.append(f"{kernel:<{width}} {_dtype(e['spec']):<5} {ws:<5} {e['registers']:>4} {e['spill']:>5} "
                     f"{e['shared'] / 1024:>6.1f} {e['blocks_per_sm']:>6} {len(e['cases']):>5}  "
                     f"{_describe(e['spec'])}{_flag(e['violations'])}")
    for name, r in zip(names[len(entries):], cuda_rows):
        lines.append(f"{name:<{width}} {'':<5} {'':<5} {r['registers']:>4} {r['spill']:>5} "
                     f"{r['shared'] / 1024:>6.1f} {'-':>6} {'':>5}  {r['arch']}{_flag(r['violations'])}")
    return "\n".join(lines)


def format_device_table(rows: list[dict]) -> str:
    """The ``--device`` table: one row per kernel the GPU compiled, as the driver reports it."""
    names = [r["kernel"].split(":")[1] for r in rows]
    width, header = _kernel_column(names)
    lines = [f"{header} {'w/s':<5} {'regs':>4} {'spill':>5} {'smemKB':>6} {'blk/SM':>6} {'cases':>5}  first case"]
    for name, r in zip(names, rows):
        lines.append(f"{name:<{width}} {r['num_warps']}/{r['num_stages']:<3} {r['registers']:>4} {r['spill']:>5} "
                     f"{r['shared'] / 1024:>6.1f} {r['blocks_per_sm']:>6} {len(r['cases']):>5}  {r['cases'][0]}"
                     f"{_flag(r['violations'])}")
    return "\n".join(lines)


def summary_lines(case: str, rows: list[dict], violations: int) -> list[dict]:
    """Lines for the suite's summary table (bench/summary.py)."""
    regs = [r["registers"] for r in rows if r.get("registers") is not None]
    return [
        {"case": case, "measure": "distinct kernels", "value": len(rows)},
        {"case": case, "measure": "spilling, over shared memory or not compiling", "value": violations},
        {"case": case, "measure": "most registers per thread", "value": max(regs) if regs else None, "vs": "255"},
    ]


def sm90_report(entries: list[dict], cuda_rows: list[dict], library: str | None, num_records: int,
                seconds: dict) -> dict:
    """``static_sm90.json``: the target and limits, each distinct launch with its resources, verdicts and
    cases, the CUDA extension's kernels, the violation count and the summary lines."""
    import triton
    from static_resources import SM90

    violations = sum(bool(e["violations"]) for e in entries) + sum(bool(r["violations"]) for r in cuda_rows)
    return {
        "target": "sm_90a (cuda:90, triton GPUTarget('cuda', 90, 64))",
        "triton": triton.__version__,
        "limits": SM90,
        "recorded_launches": num_records,
        "distinct_launches": len(entries),
        "violations": violations,
        "seconds": seconds,
        "summary": summary_lines("Triton launches, sm_90a compile", entries, violations),
        "launches": [
            {
                "kernel": e["spec"]["kernel"], "constexprs": e["spec"]["constexprs"], "options": e["spec"]["options"],
                "signature": e["spec"]["signature"], "attrs": e["spec"]["attrs"],
                "registers": e.get("registers"), "spill_bytes": e.get("spill"), "shared_bytes": e.get("shared"),
                "blocks_per_sm": e["blocks_per_sm"], "compile_s": e["compile_s"], "error": e["error"],
                "violations": e["violations"], "num_cases": len(e["cases"]), "cases": e["cases"],
            }
            for e in entries
        ],
        "cuda_extension": {"library": library, "kernels": cuda_rows},
    }
