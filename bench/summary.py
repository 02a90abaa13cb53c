"""One summary of a benchmark results folder: ``summary.md`` (one table across the suite) and PNG plots.

``run_all.py`` calls it at the end of a run; it also re-renders a committed folder:

    python bench/summary.py bench/results/2026-12-01_cpu_vm

Every ratio reads the same way: "× fewer bytes than per-branch decode" (higher is better) and "× the unique
bytes" (1.0 is the floor, higher is worse), "× the floor" for times (1.0 is the floor), "× faster than the best
peer" (the fastest of the peers timed on the same row; a peer that did not run is listed with the reason). A
benchmark that is not one of the known attention/planner rows can add its own lines to the table with a ``summary``
list in its JSON payload: ``[{"case": ..., "measure": ..., "value": ..., "vs": ...}, ...]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

MB = 1e6


def gpu_line(env: dict) -> str:
    """The summary's first line: whether a GPU was used and, if not, that kernel timings were skipped."""
    if env.get("cuda_available"):
        return (f"GPU: {env.get('gpu', 'CUDA device')} ({env.get('sm_count', '?')} SMs, CUDA {env.get('cuda', '?')}) — "
                "kernel rows are GPU timings (CUDA-graph replay, median).")
    return ("No GPU: torch.cuda.is_available() is False on this machine, so kernel timings were skipped; "
            "attention rows are CPU byte models (what each method reads per layer) and planner rows are host times.")


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        text = f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    else:
        text = str(v)
    return f"{text} {unit}".strip()


def _attention_lines(bench: str, payload: dict) -> list[dict]:
    lines = []
    for row in payload.get("rows", []):
        if "unique_bytes" not in row:
            continue
        case = row["workload"] + (f", {row['heads']} heads" if "heads" in row else "")
        if bench != "tree_decode" and "dtype" in row:
            case += f", {row['dtype']}"
        tre, uniq, naive = row["treeattn_bytes"], row["unique_bytes"], row["per_branch_bytes"]
        if naive == tre:
            vs_branch = "the same bytes as per-branch decode"
        elif naive > tre:
            vs_branch = f"{naive / tre:.2f}× fewer than per-branch decode"
        else:
            vs_branch = f"{tre / naive:.2f}× MORE than per-branch decode"
        lines.append({"benchmark": bench, "case": case, "measure": "bytes per layer (model)",
                      "value": _fmt(tre / MB, "MB"), "vs": f"{vs_branch}; {tre / uniq:.2f}× the unique bytes"})
        us = row.get("treeattn_us")
        if us:
            vs = [f"{us / row['floor_us']:.2f}× the floor ({row['floor_us']:.1f} µs, {row.get('bound', '?')}-bound)"]
            for peer in sorted(k[: -len("_us")] for k in row if k.endswith("_us") and k not in
                               ("treeattn_us", "floor_us", "floor_memory_us", "floor_compute_us", "plan_host_us")):
                peer_us = row.get(f"{peer}_us")
                if peer_us:
                    vs.append(f"{peer_us / us:.2f}× faster than {peer}" if peer_us >= us
                              else f"{us / peer_us:.2f}× SLOWER than {peer}")
            lines.append({"benchmark": bench, "case": case, "measure": "kernel time (GPU)", "value": _fmt(us, "µs"),
                          "vs": "; ".join(vs)})
        lines += _peer_lines(bench, case, row)
    return lines


def _peer_lines(bench: str, case: str, row: dict) -> list[dict]:
    """The row against its peers: treeattn's ratio to the fastest peer timed, then the peers that did not run
    and why (grouped by reason)."""
    lines = []
    best = row.get("best_peer")
    if best:
        ratio = row["speedup_vs_best_peer"]
        value = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× SLOWER"
        lines.append({"benchmark": bench, "case": case, "measure": "treeattn vs the best peer (GPU)", "value": value,
                      "vs": f"best peer: {best} ({row[f'{best}_us']:.1f} µs)"})
    reasons: dict[str, list[str]] = {}
    for name, reason in row.get("peers_skipped", {}).items():
        reasons.setdefault(f"skipped: {reason}", []).append(name)
    for key in sorted(row):
        if key.endswith("_error") and not key.startswith("treeattn"):
            reasons.setdefault(f"failed: {row[key]}", []).append(key[: -len("_error")])
    for reason, names in reasons.items():
        lines.append({"benchmark": bench, "case": case, "measure": "peers not timed", "value": ", ".join(names),
                      "vs": reason})
    return lines


def target_text(value_us: float, target_us: float) -> str:
    """How a host time compares with its target: "meets target ≤ T µs (X µs under)" or "misses target ≤ T µs by
    X µs (R× the target)"."""
    if value_us <= target_us:
        return f"meets target ≤ {target_us:g} µs ({target_us - value_us:.1f} µs under)"
    return f"misses target ≤ {target_us:g} µs by {value_us - target_us:.1f} µs ({value_us / target_us:.2g}× the target)"


def _planner_lines(bench: str, payload: dict) -> list[dict]:
    """Planner host times; a row's ``targets`` ({time key: target µs}) adds how each compares with its target."""
    lines = []
    for row in payload.get("rows", []):
        case = row.get("case") or row.get("workload")
        targets = row.get("targets", {})
        host_rows = (("plan_host_us", "treeattn.plan host time"), ("cache_plan_us", "TreeKVCache.plan host time"))
        for key, label in host_rows:
            if key in row and "unique_bytes" not in row:
                vs = f"{row.get('queries', '?')} queries, {row.get('nnz_pages', '?')} pages"
                if key in targets:
                    vs += "; " + target_text(row[key], targets[key])
                value = _fmt(row[key], "µs")
                lines.append({"benchmark": bench, "case": case, "measure": label, "value": value, "vs": vs})
    return lines


def collect(results: Path) -> tuple[dict, list[dict]]:
    """(environment of the run, summary lines) from every ``*.json`` in ``results``."""
    env, lines = {}, []
    for path in sorted(results.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict):
            continue
        env = env or dict(payload.get("env", {}))
        if "peers" in payload.get("env", {}):
            env["peers"] = payload["env"]["peers"]
        bench = path.stem
        lines += _attention_lines(bench, payload) + _planner_lines(bench, payload)
        for line in payload.get("summary", []):
            lines.append({"benchmark": bench, **{k: _fmt(v) if k == "value" else v for k, v in line.items()}})
    return env, lines


def markdown(env: dict, lines: list[dict]) -> str:
    head = ["# Benchmark summary", "", gpu_line(env), ""]
    where = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "triton") if env.get(k))
    commit = env.get("commit")
    head += [f"Machine: {env.get('gpu') or env.get('cpu', '?')}; {where}; commit {commit[:10] if commit else '?'}"
             f"{' (with uncommitted changes)' if env.get('dirty') else ''}.", ""]
    if env.get("peers"):
        head += ["Peers: " + ", ".join(f"{k} {v}" for k, v in env["peers"].items()) + ".", ""]
    cols = ("benchmark", "case", "measure", "value", "vs")
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(line.get(c, "")) for c in cols) + " |" for line in lines]
    return "\n".join(head + table) + "\n"


def _grouped_barh(path: Path, labels: list[str], series: dict[str, list[float]], xlabel: str, title: str) -> Path:
    """One horizontal bar per (label, series), log scale: labels stay readable however long they are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.2 * len(labels) * len(series)))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.barh([y + (i - (len(series) - 1) / 2) * width for y in range(len(labels))], values, width, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(results: Path) -> list[Path]:
    """PNG plots next to the JSON: bytes per method (every attention row) and, on a GPU, µs against the floor."""
    rows = []
    for path in sorted(results.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict):
            rows += [(path.stem, r) for r in payload.get("rows", []) if "unique_bytes" in r]
    if not rows:
        return []
    labels = [f"{b}: {r['workload']}" + (f", {r['heads']} heads" if "heads" in r else "") for b, r in rows]
    series = {name: [r[key] / MB for _, r in rows] for key, name in (
        ("unique_bytes", "unique KV (floor)"), ("treeattn_bytes", "treeattn"),
        ("per_branch_bytes", "per-branch split-KV decode"))}
    written = [_grouped_barh(results / "bytes.png", labels, series, "MB read per layer (model)",
                             "Bytes each method reads per decode step and layer")]
    timed = [(label, r) for label, (_, r) in zip(labels, rows) if r.get("treeattn_us")]
    if timed:
        methods = sorted({k[:-3] for _, r in timed for k in r if k.endswith("_us") and k not in
                          ("floor_memory_us", "floor_compute_us", "plan_host_us")})
        series = {m: [r.get(f"{m}_us") or 0 for _, r in timed] for m in methods}
        written.append(_grouped_barh(
            results / "kernel_us.png", [label for label, _ in timed], series, "µs (median, CUDA-graph replay)",
            "Kernel time per decode step and layer (floor: the larger of bytes/bandwidth and FLOPs/rate)"))
    return written


def write_summary(results: str | Path) -> tuple[str, list[Path]]:
    """Writes ``summary.md`` and the plots into ``results``; returns the markdown and the plot paths."""
    results = Path(results)
    env, lines = collect(results)
    text = markdown(env, lines)
    (results / "summary.md").write_text(text)
    try:
        pngs = plots(results)
    except ImportError as exc:  # matplotlib missing: the table still stands
        text += f"\n(no plots: {exc}; pip install matplotlib)\n"
        pngs = []
    return text, pngs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("results", help="a results folder (JSON files from bench/run_all.py)")
    args = parser.parse_args(argv)
    text, pngs = write_summary(args.results)
    print(text)
    for p in pngs:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
