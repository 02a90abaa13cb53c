"""The benchmark suite (main job): every bench module in one run, results as JSON in one folder.

On a GPU it times kernels; on CPU it reports plans, host planning time and the bytes each method would read.

    python bench/run_all.py --out bench/results/latest
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SUITE = ("bench_plan", "bench_cache_plan", "bench_tree_decode", "bench_mla")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/latest")
    args = parser.parse_args(argv)
    failed = []
    for name in SUITE:
        if not (Path(__file__).parent / f"{name}.py").exists():
            continue
        print(f"\n== {name}")
        try:
            importlib.import_module(name).main(["--out", args.out])
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
