"""Host cost of ``treeattn.plan``: the median of single calls (page ids shuffled, as in a long-running pool).

Targets (µs, median of single calls on the 2-core development VM): 256 queries × 8k tokens at page size 16
with no sharing ≤ 100; 256 branches of one 8k prompt ≤ 60. Each row prints its target and the summary says by
how much it meets or misses it; nothing asserts a time. Host time is real on any machine, so this runs (and
reports) on CPU as well as on the GPU machine.

    python bench/bench_plan.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import treeattn  # noqa: E402
from treeattn.testing import tree_table, workload_table  # noqa: E402

CASES = {
    "hydragen_P8k_N256_S64 (shared)": lambda: workload_table("hydragen_P8k_N256_S64"),  # 256 branches of an 8k prompt
    "256 x 8k, no sharing": lambda: tree_table([0, 8192], [1, 256], 16),
    "tree_2k_4x1k_4x512_4x128": lambda: workload_table("tree_2k_4x1k_4x512_4x128"),
    "bestofN_P4k_N64_S256": lambda: workload_table("bestofN_P4k_N64_S256"),
}


# Host-time targets (µs) of the cases that have one.
TARGETS_US = {"256 x 8k, no sharing": 100.0, "hydragen_P8k_N256_S64 (shared)": 60.0}


def median_plan_us(table, repeats: int) -> float:
    args = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    return common.host_us(lambda: treeattn.plan(*args, page_size=table.page_size, device="cpu"), repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    parser.add_argument("--repeats", type=int, default=201)
    args = parser.parse_args(argv)
    rows = []
    for name, make in CASES.items():
        table = make()
        row = {"case": name, "queries": table.num_queries, "nnz_pages": int(table.kv_indices.numel()),
               "plan_host_us": median_plan_us(table, args.repeats)}
        if name in TARGETS_US:
            row["target_us"] = TARGETS_US[name]
            row["targets"] = {"plan_host_us": TARGETS_US[name]}
        rows.append(row)
    common.print_table(rows, ["case", "queries", "nnz_pages", "plan_host_us", "target_us"])
    print(f"wrote {common.write_results(args.out, 'plan', {'env': common.environment(), 'rows': rows})}")


if __name__ == "__main__":
    main()
