"""The benchmark suite (main job): every bench module in one run, results as JSON in one folder, then one
summary (``summary.md`` + PNG plots, see ``summary.py``) printed at the end.

On a GPU it times kernels; on CPU it reports plans, host planning time and the bytes each method would read.

    python bench/run_all.py --out bench/results/latest
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import summary  # noqa: E402

SUITE = ("bench_plan", "bench_cache_plan", "bench_host", "bench_tree_decode", "bench_mla", "bench_hf", "bench_search",
         "bench_fp8", "static_check")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/latest")
    args = parser.parse_args(argv)
    env = {"cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    print(summary.gpu_line(env), flush=True)
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
