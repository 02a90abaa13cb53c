"""Host cost of ``TreeKVCache.plan`` against ``treeattn.plan`` on the same trees (the cache's plan, which knows
the tree, must be at least as cheap as re-detecting the sharing from the page table).

Each benchmark workload (``treeattn.testing.WORKLOADS``) is built in a TreeKVCache (``add(prompt)``, then ``fork``
+ ``append`` per level; one query per leaf). ``table_plan_us`` is ``treeattn.plan`` on the CSR table of the leaves'
paths; ``cache_plan_us`` re-plans the same tree; ``cache_plan_after_append_us`` plans right after every leaf grew
by one token (a decode loop's step: on most steps no leaf starts or fills a page and the last plan is patched for
the new lengths, on the others planned in full, so the median is the patched step's);
``cache_plan_new_nodes_us`` plans a different node list every call (the leaves
in turn forwards and backwards, as when branches change every step), so the cache cannot reuse the subtree it found
for the last call; ``append_us`` is the host time of that step's ``cache.append(leaves)`` (one token per leaf: page
bookkeeping and the new slots). Host time is real on any machine, so this runs on CPU as well as on the GPU
machine.

    python bench/bench_cache_plan.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import treeattn  # noqa: E402
from treeattn.testing import WORKLOADS  # noqa: E402

PAGE_SIZE = 16
# Host-time targets (µs) of TreeKVCache.plan, by workload.
CACHE_PLAN_TARGETS_US = {"hydragen_P8k_N256_S64": 30.0}
# ... and of TreeKVCache.plan after every leaf appended one token (the incremental plan), by workload.
AFTER_APPEND_TARGETS_US = {"hydragen_P8k_N256_S64": 30.0}


def build_tree(name: str, appends: int) -> tuple[treeattn.TreeKVCache, list[int]]:
    """The workload's tree in a host-only cache (one tiny layer: only the bookkeeping matters here), with
    room for every leaf to grow by ``appends`` more tokens."""
    level_tokens, fanout = WORKLOADS[name]
    nodes, pages = 1, 0
    for tokens, ways in zip(level_tokens, fanout):
        nodes *= ways
        pages += nodes * (-(-tokens // PAGE_SIZE) + 1)  # + 1: a copy on write of the parent's partial page
    cache = treeattn.TreeKVCache(1, 1, 1, page_size=PAGE_SIZE, num_pages=pages + nodes * appends,
                                 dtype=torch.float32, device="cpu")
    frontier = [cache.add(level_tokens[0]) for _ in range(fanout[0])]
    for tokens, ways in zip(level_tokens[1:], fanout[1:]):
        frontier = [kid for node in frontier for kid in cache.fork(node, ways)]
        cache.append(frontier, tokens)
    return cache, frontier


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    parser.add_argument("--repeats", type=int, default=101)
    args = parser.parse_args(argv)
    rows = []
    for name in WORKLOADS:
        cache, leaves = build_tree(name, appends=2 * (args.repeats + 1))  # two timed runs of appends, warm-ups included
        table = cache.plan(leaves)
        csr = (table.kv_indptr, table.kv_indices, table.kv_last_page_len)
        row = {
            "workload": name,
            "queries": len(leaves),
            "nnz_pages": int(table.kv_indices.numel()),
            "table_plan_us": common.host_us(
                lambda: treeattn.plan(*csr, page_size=PAGE_SIZE, device="cpu"), args.repeats),
            "cache_plan_us": common.host_us(lambda: cache.plan(leaves), args.repeats),
        }
        row["cache_plan_after_append_us"] = common.host_us(lambda: cache.plan(leaves), args.repeats,
                                                           before=lambda: cache.append(leaves))
        row["append_us"] = common.host_us(lambda: cache.append(leaves), args.repeats)
        orders, calls = [leaves, leaves[::-1]], itertools.count()
        row["cache_plan_new_nodes_us"] = common.host_us(lambda: cache.plan(orders[next(calls) % 2]), args.repeats)
        row["cache_vs_table"] = row["cache_plan_us"] / row["table_plan_us"]
        if name in CACHE_PLAN_TARGETS_US:
            row["cache_plan_target_us"] = CACHE_PLAN_TARGETS_US[name]
            row["targets"] = {"cache_plan_us": CACHE_PLAN_TARGETS_US[name]}
        if name in AFTER_APPEND_TARGETS_US:
            row["cache_plan_after_append_target_us"] = AFTER_APPEND_TARGETS_US[name]
            row.setdefault("targets", {})["cache_plan_after_append_us"] = AFTER_APPEND_TARGETS_US[name]
        rows.append(row)
    common.print_table(rows, ["workload", "queries", "nnz_pages", "table_plan_us", "cache_plan_us",
                              "cache_plan_target_us",
                              "cache_vs_table",
                              "cache_plan_after_append_us", "cache_plan_after_append_target_us",
                              "cache_plan_new_nodes_us", "append_us"])
    print(f"wrote {common.write_results(args.out, 'cache_plan', {'env': common.environment(), 'rows': rows})}")


if __name__ == "__main__":
    main()
