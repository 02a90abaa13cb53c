"""Static sm_90a check: every Triton launch the public ops make compiles for Hopper without register spills
and within shared memory; the CUDA extension's kernels are read from their cubins the same way. No GPU needed.

Three steps, each in its own process:

1. **record** (``TRITON_INTERPRET=1``): drive ``tree_decode``, ``mla_tree_decode``, ``merge_state`` and the
   ``TreeKVCache`` write/copy paths over :func:`matrix` with every Triton launch recorded and *not executed*
   (kernel, arguments, constexprs, ``num_warps``, ``num_stages``). Nothing runs, so bf16 (which the
   interpreter cannot execute) is recorded like fp16, and token counts cost nothing but planning.
2. **compile** (no interpreter, so the ``@triton.jit`` objects are real): specialise each recorded launch as
   Triton's JIT would for ``cuda:90`` (argument types, divisibility, constexprs), keep the distinct ones,
   compile each to an sm_90a cubin (a process pool; results cached on disk by launch key) and read
   registers, spill stack and shared memory with ``cuobjdump --dump-resource-usage``.
3. **report**: a table on stdout, ``static_sm90.json`` in ``--out``, exit status 1 on any launch that does not
   compile, spills, or needs more shared memory than an sm_90 block may have.

The matrix of calls is ``static_matrix.py``, step 1 ``static_record.py``, step 2 and the verdicts
``static_resources.py``, step 3 ``static_report.py``; this file is the command line that runs them.

    python bench/static_check.py --out bench/results/latest [--jobs N] [--quick] [--cases REGEX]
    python bench/static_check.py --device --quick --out DIR   # on a GPU: what the driver reports
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from static_matrix import matrix
from static_record import device_check, record
from static_report import format_device_table, format_table, sm90_report, summary_lines
from static_resources import compile_all, cuda_extension_kernels


def _device_main(out: Path, cases: list) -> int:
    import torch
    import triton

    rows = device_check(cases)
    violations = sum(bool(r["violations"]) for r in rows)
    device = torch.cuda.get_device_name()
    report = {"device": device, "triton": triton.__version__, "kernels": rows, "violations": violations,
              "summary": summary_lines(f"kernels on {device}", rows, violations)}
    (out / "static_device.json").write_text(json.dumps(report, indent=1))
    print(format_device_table(rows))
    print(f"\n{len(rows)} kernels on {device} (driver's registers and spills); "
          f"{violations} violation(s) -> {out / 'static_device.json'}")
    return 1 if violations else 0


def _run_step(argv: list[str], interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    subprocess.run([sys.executable, __file__, *argv], env=env, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", default="bench/results/latest", help="folder for static_sm90.json")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile processes")
    parser.add_argument("--quick", action="store_true", help="a small slice of the matrix")
    parser.add_argument("--cases", metavar="REGEX", help="only the matrix cases whose label matches")
    parser.add_argument("--device", action="store_true",
                        help="on a GPU: run the cases and report registers and spills as the driver sees them")
    parser.add_argument("--record", metavar="FILE", help=argparse.SUPPRESS)  # step 1 (interpreter process)
    parser.add_argument("--compile", nargs=2, metavar=("RECORDS", "RESULT"), help=argparse.SUPPRESS)  # step 2
    args = parser.parse_args(argv)

    cases = [c for c in matrix(args.quick) if not args.cases or re.search(args.cases, c.label)]
    if args.record:
        Path(args.record).write_text(json.dumps(record(cases)))
        return 0
    if args.compile:
        records = json.loads(Path(args.compile[0]).read_text())
        Path(args.compile[1]).write_text(json.dumps(compile_all(records, args.jobs)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device:
        return _device_main(out, cases)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records_file, result_file = os.path.join(tmp, "records.json"), os.path.join(tmp, "result.json")
        _run_step(["--record", records_file] + (["--quick"] if args.quick else [])
                  + (["--cases", args.cases] if args.cases else []), interpret=True)
        recorded_s = time.perf_counter() - start
        _run_step(["--compile", records_file, result_file, "--jobs", str(args.jobs)], interpret=False)
        num_records = len(json.loads(Path(records_file).read_text()))
        entries = json.loads(Path(result_file).read_text())
    so_path, cuda_rows = cuda_extension_kernels()
    seconds = time.perf_counter() - start

    report = sm90_report(entries, cuda_rows, so_path, num_records,
                         {"total": round(seconds, 1), "record": round(recorded_s, 1)})
    (out / "static_sm90.json").write_text(json.dumps(report, indent=1))
    print(format_table(entries, cuda_rows))
    if so_path is None:
        print("(treeattn._C not built: no CUDA extension kernels to check)")
    print(f"\n{len(entries)} distinct Triton launches from {num_records} recorded"
          f"{f', {len(cuda_rows)} CUDA extension kernels' if cuda_rows else ''}; "
          f"{report['violations']} violation(s); {seconds:.0f} s -> {out / 'static_sm90.json'}")
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
