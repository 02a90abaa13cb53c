"""The benchmark suite (main job): every bench module in one run, results as JSON in one folder, then one
summary (``summary.md`` + PNG plots, see ``summary.py``) printed at the end.

On a GPU it times kernels, treeattn's and its peers' (``peers.py``) on the same inputs; on CPU it reports
plans, host planning time and the bytes each method would read, and lists the peers as skipped.

    python bench/run_all.py --out bench/results/local/latest

``bench/results/local/`` is ignored by git; a run worth keeping is copied to ``bench/results/<date>_<host>/``
and committed (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import summary  # noqa: E402

DEFAULT_OUT = "bench/results/local/latest"
SUITE = ("bench_plan", "bench_cache_plan", "bench_host", "bench_tree_decode", "bench_mla", "bench_hf", "bench_search",
         "bench_fp8", "bench_prefix", "bench_speculative", "static_check")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the JSON results, summary.md and plots "
                             f"(default {DEFAULT_OUT}, ignored by git)")
    args = parser.parse_args(argv)
    env = {"cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    print(summary.gpu_line(env), flush=True)
    if not env["cuda_available"]:
        # The suite's counts and accuracy rows call the ops on CPU on purpose; the one-time notice that they
        # run the fp32 reference there would name whichever internal op came first, not anything asked for.
        warnings.filterwarnings("ignore", message=r"treeattn: \w+ on cpu runs the slow fp32 reference",
                                category=RuntimeWarning)
        print("(On CPU the suite's accuracy and count rows run treeattn's ops on the fp32 reference or the "
              "Triton interpreter; that is expected here.)", flush=True)
    suite = [name for name in SUITE if (Path(__file__).parent / f"{name}.py").exists()]
    if env["cuda_available"]:  # a short GPU window: the kernels' soundness first, then the timings
        suite.sort(key=lambda name: name != "static_check")
    failed, start = [], time.perf_counter()
    for i, name in enumerate(suite, 1):
        print(f"\n== [{i}/{len(suite)}] {name} ({time.perf_counter() - start:.0f} s into the suite)", flush=True)
        argv = ["--out", args.out]
        if name == "static_check" and env["cuda_available"]:
            argv += ["--device", "--quick"]  # the driver's registers and spills (CI checks the full matrix statically)
        try:
            if importlib.import_module(name).main(argv):  # a nonzero status: the module found a violation
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    text, pngs = summary.write_summary(args.out)
    print(f"\n{text}")
    for path in pngs:
        print(f"wrote {path}")
    print(f"wrote {Path(args.out) / 'summary.md'} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
