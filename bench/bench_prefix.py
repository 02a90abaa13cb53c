"""Prefix caching on traces shaped like the SGLang paper's workloads: how many prompt tokens are computed with
and without a prefix cache, the hit rate, the same trace under page-granular matching (what a cache that
matches whole pages only does), and the hit rate as a function of the pool size (the eviction curve).

The traces (token ids are random; generated tokens stand for a model's):

- ``few_shot``: a shared 8-shot prefix of 1500 tokens, 64 questions of ~40 tokens, 32-token answers;
- ``multi_turn``: 8 conversations of 8 turns; each turn is the previous sequence plus a ~30-token message,
  64-token replies; conversations interleave;
- ``self_consistency``: 16 samples per question (one call each), 16 questions behind a shared 300-token
  instruction, 48-token samples;
- ``tree_of_thought``: a search that expands thoughts of 24 tokens, 3 per node, to depth 4, and returns to
  nodes explored earlier, 4 returns per depth (each expansion is a call whose prompt is the node's whole
  path).

Each call is served through :class:`treeattn.prefix_cache.PrefixKVCache` over a ``TreeKVCache`` exactly as
``treeattn.hf.generate`` serves it (match, prefill the rest, decode, cache prompt and continuation, release),
without a model: the counts do not depend on one. Page-granular matching rounds each hit down to whole
pages. ``host_s`` is the host time of the whole
trace's cache bookkeeping (no model).

    python bench/bench_prefix.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import treeattn  # noqa: E402
from treeattn import OutOfPages  # noqa: E402
from treeattn.prefix_cache import PrefixKVCache  # noqa: E402

PAGE_SIZE = 16


def _toks(rng, n):
    return rng.integers(1, 32000, n).tolist()


def few_shot(rng):
    prefix = _toks(rng, 1500)
    return [(prefix + _toks(rng, int(rng.integers(30, 50))), 32) for _ in range(64)]


def multi_turn(rng):
    """(conversation, message, reply tokens) per call: 8 turns of 8 interleaved conversations."""
    return [(c, _toks(rng, int(rng.integers(20, 40))), 64) for _ in range(8) for c in range(8)]


def self_consistency(rng):
    instruction = _toks(rng, 300)
    return [(instruction + q, 48) for q in (_toks(rng, 40) for _ in range(16)) for _ in range(16)]


def serve(pc: PrefixKVCache | None, cache, prompt, new_tokens, rng, page_granular=False):
    """One generate-like call: returns (prompt tokens computed, the whole sequence)."""
    tokens = list(prompt)
    if pc is None:
        leaf = cache.add(len(tokens))
        hit, lock = 0, None
    else:
        h = pc.match(None, tokens)
        hit, lock, leaf = h.length, h.lock, h.leaf
        if page_granular and hit % PAGE_SIZE:
            pc.index.unhit(hit % PAGE_SIZE)
            keep = hit - hit % PAGE_SIZE
            if leaf is not None:
                new = pc.reserve(lambda: cache.fork_at(leaf, keep)) if keep else None
                cache.release(leaf)
                leaf = new
            hit = keep
        if leaf is None:
            leaf = pc.reserve(lambda: cache.add(len(tokens)))
        else:
            pc.reserve(lambda: cache.append([leaf], len(tokens) - hit))
        pc.count_prefill(len(tokens) - hit)
    out = tokens + _toks(rng, new_tokens)
    grow = (lambda: cache.append([leaf], new_tokens - 1)) if new_tokens > 1 else None
    if grow is not None:
        (pc.reserve(grow) if pc is not None else grow())
    if pc is not None:
        pc.insert(None, out[: cache.length(leaf)], leaf)
        cache.release(leaf)
        pc.unlock(lock)
    else:
        cache.release(leaf)
    return len(tokens) - hit, out


def run_trace(name, num_pages, mode, seed=0):
    """mode: "none", "token" or "page"; returns the row."""
    rng = np.random.default_rng(seed)
    data_rng = np.random.default_rng(seed + 1)
    cache = treeattn.TreeKVCache(1, 1, 1, page_size=PAGE_SIZE, num_pages=num_pages, dtype=torch.float32,
                                 device="cpu")
    pc = None if mode == "none" else PrefixKVCache(cache)
    computed = prompt_total = 0
    failed = 0

    def call(prompt, n):
        nonlocal computed, prompt_total, failed
        try:
            c, out = serve(pc, cache, prompt, n, rng, page_granular=mode == "page")
        except OutOfPages:  # (a call larger than the pool: counted apart)
            failed += 1
            return None
        prompt_total += len(prompt)
        computed += c
        return out

    t0 = time.perf_counter()
    if name == "multi_turn":
        seqs = {}
        for c, msg, n in multi_turn(data_rng):
            prompt = seqs.get(c, []) + msg
            out = call(prompt, n)
            seqs[c] = out if out is not None else prompt
    elif name == "tree_of_thought":
        # Thoughts of 24 tokens, 3 per node, a beam of 9 kept per depth, and after each depth 4 returns to
        # nodes explored earlier (each expansion is a call whose prompt is the node's whole path).
        frontier = explored = [_toks(data_rng, 200)]
        for _ in range(4):
            grown = [out for node in frontier for out in (call(node, 24) for _ in range(3)) if out is not None]
            explored = explored + grown
            for j in data_rng.choice(len(explored), 4):
                call(explored[j], 24)
            frontier = grown[:9]
    else:
        for prompt, n in (few_shot if name == "few_shot" else self_consistency)(data_rng):
            call(prompt, n)
    wall = time.perf_counter() - t0
    row = {"trace": name, "matching": mode, "num_pages": num_pages, "prompt_tokens": prompt_total,
           "prefill_tokens": computed, "hit_rate": 1 - computed / prompt_total if prompt_total else 0.0,
           "failed_calls": failed, "host_s": round(wall, 3)}
    if pc is not None:
        s = pc.stats()
        row.update(evicted_tokens=s["evicted_tokens"], cached_tokens=s["cached_tokens"])
    return row


TRACES = ("few_shot", "multi_turn", "self_consistency", "tree_of_thought")


def summary_lines(rows: list[dict]) -> list[dict]:
    """The suite summary's lines (see summary.py): per trace, prompt tokens computed with the token-granular
    cache against none and against page-granular matching."""
    by = {(r["trace"], r["matching"]): r for r in rows}
    lines = []
    for name in TRACES:
        none, token, page = (by.get((name, m)) for m in ("none", "token", "page"))
        if not (none and token and page):
            continue
        lines.append({
            "case": name, "measure": f"prompt tokens computed, prefix cache of {token['num_pages']} pages",
            "value": f"{token['prefill_tokens']} of {none['prefill_tokens']} ({token['hit_rate']:.1%} hit)",
            "vs": f"page-granular matching: {page['prefill_tokens']} ({page['hit_rate']:.1%} hit); "
                  "hit rate against pool size: prefix_eviction.png"})
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default=None)
    parser.add_argument("--pools", default="64,128,256,512,1024,4096", help="pool sizes (pages) of the eviction curve")
    args = parser.parse_args(argv)
    run_trace("tree_of_thought", 4096, "token")  # warm-up: the first page copy loads the copy kernel
    rows = []
    for name in TRACES:
        for mode in ("none", "token", "page"):
            rows.append(run_trace(name, 4096, mode))
    curve = [run_trace(name, int(p), "token") for name in TRACES for p in args.pools.split(",")]
    common.print_table(rows, ["trace", "matching", "prompt_tokens", "prefill_tokens", "hit_rate", "host_s"])
    common.print_table(curve, ["trace", "num_pages", "hit_rate", "evicted_tokens", "failed_calls"])
    if args.out:
        path = common.write_results(args.out, "prefix", {"env": common.environment(), "rows": rows, "curve": curve,
                                                         "summary": summary_lines(rows)})
        _plot(curve, Path(path).with_name("prefix_eviction.png"))
    return 0


def _plot(curve, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in TRACES:
        pts = [(r["num_pages"], r["hit_rate"]) for r in curve if r["trace"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"pool size (pages of {PAGE_SIZE} tokens)")
    ax.set_ylabel("prompt hit rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
