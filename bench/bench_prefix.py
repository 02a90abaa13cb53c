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
pages. ``host_s`` is the host time of the whole trace's cache bookkeeping (no model).

``model_rows``: each trace scaled down (``SHAPES["model"]``: a 192-token few-shot prefix, a 96-token
instruction, a few calls and a few tokens per answer) through ``treeattn.hf.generate`` on a tiny random HF
Llama on the CPU, greedy, with a ``treeattn.hf.PrefixCache`` and without: CPU wall seconds of the whole
trace and the prompt tokens computed (the outputs are checked equal).

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

# The traces' shapes: "full" for the bookkeeping rows, "model" scaled down for a tiny random HF model on the CPU.
SHAPES = {
    "full": dict(vocab=32000, shots=1500, questions=64, question=(30, 50), answer=32, conversations=8, turns=8,
                 message=(20, 40), reply=64, instruction=300, sc_questions=16, samples=16, sc_question=40,
                 sample=48, root=200, thought=24, branching=3, depth=4, returns=4, beam=9),
    "model": dict(vocab=128, shots=192, questions=4, question=(6, 10), answer=4, conversations=2, turns=2,
                  message=(5, 9), reply=6, instruction=96, sc_questions=2, samples=3, sc_question=8, sample=4,
                  root=48, thought=4, branching=2, depth=2, returns=1, beam=2),
}


def _toks(rng, n, vocab=32000):
    return rng.integers(1, vocab, n).tolist()


def few_shot(rng, shape=SHAPES["full"]):
    v, (lo, hi) = shape["vocab"], shape["question"]
    prefix = _toks(rng, shape["shots"], v)
    return [(prefix + _toks(rng, int(rng.integers(lo, hi)), v), shape["answer"]) for _ in range(shape["questions"])]


def multi_turn(rng, shape=SHAPES["full"]):
    """(conversation, message, reply tokens) per call: turns of interleaved conversations."""
    v, (lo, hi), n = shape["vocab"], shape["message"], shape["conversations"]
    return [(c, _toks(rng, int(rng.integers(lo, hi)), v), shape["reply"]) for _ in range(shape["turns"])
            for c in range(n)]


def self_consistency(rng, shape=SHAPES["full"]):
    v = shape["vocab"]
    instruction = _toks(rng, shape["instruction"], v)
    return [(instruction + q, shape["sample"]) for q in (_toks(rng, shape["sc_question"], v)
                                                         for _ in range(shape["sc_questions"]))
            for _ in range(shape["samples"])]


def drive(name, data_rng, call, shape=SHAPES["full"]) -> None:
    """Run trace ``name``: ``call(prompt, new_tokens)`` serves one request and returns the whole sequence
    (None when it failed)."""
    if name == "multi_turn":
        seqs = {}
        for c, msg, n in multi_turn(data_rng, shape):
            prompt = seqs.get(c, []) + msg
            out = call(prompt, n)
            seqs[c] = out if out is not None else prompt
    elif name == "tree_of_thought":
        # Thoughts of a few tokens, a few per node, a beam kept per depth, and after each depth returns to
        # nodes explored earlier (each expansion is a call whose prompt is the node's whole path).
        frontier = explored = [_toks(data_rng, shape["root"], shape["vocab"])]
        for _ in range(shape["depth"]):
            grown = [out for node in frontier for out in (call(node, shape["thought"])
                                                          for _ in range(shape["branching"])) if out is not None]
            explored = explored + grown
            for j in data_rng.choice(len(explored), shape["returns"]):
                call(explored[j], shape["thought"])
            frontier = grown[: shape["beam"]]
    else:
        for prompt, n in (few_shot if name == "few_shot" else self_consistency)(data_rng, shape):
            call(prompt, n)


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
    drive(name, data_rng, call)
    wall = time.perf_counter() - t0
    row = {"trace": name, "matching": mode, "num_pages": num_pages, "prompt_tokens": prompt_total,
           "prefill_tokens": computed, "hit_rate": 1 - computed / prompt_total if prompt_total else 0.0,
           "failed_calls": failed, "host_s": round(wall, 3)}
    if pc is not None:
        s = pc.stats()
        row.update(evicted_tokens=s["evicted_tokens"], cached_tokens=s["cached_tokens"])
    return row


TRACES = ("few_shot", "multi_turn", "self_consistency", "tree_of_thought")
MODEL = "tiny random Llama (2 layers, hidden 64, fp32)"


def run_model_trace(name, model, cached: bool, seed=0):
    """Trace ``name`` at the "model" shape through ``treeattn.hf.generate`` (greedy) on ``model``, with a
    ``PrefixCache`` or without: returns the row (CPU wall seconds, prompt tokens computed) and the outputs."""
    import treeattn.hf

    pc = treeattn.hf.PrefixCache(model, num_pages=1024, page_size=PAGE_SIZE) if cached else None
    outputs, prompt_total = [], 0

    def call(prompt, n):
        nonlocal prompt_total
        out = treeattn.hf.generate(model, torch.tensor([prompt]), prefix_cache=pc, max_new_tokens=n, do_sample=False,
                                   pad_token_id=0)
        prompt_total += len(prompt)
        outputs.append(out[0].tolist())
        return outputs[-1]

    t0 = time.perf_counter()
    drive(name, np.random.default_rng(seed + 1), call, SHAPES["model"])
    wall = time.perf_counter() - t0
    computed = pc.stats()["prefill_tokens"] if pc is not None else prompt_total
    return {"trace": name, "model": MODEL, "prefix_cache": cached, "calls": len(outputs), "prompt_tokens": prompt_total,
            "prefill_tokens": computed, "wall_s": round(wall, 3)}, outputs


def model_rows(seed=0) -> list[dict]:
    """Every trace with and without the prefix cache on one tiny model (the outputs must agree)."""
    import treeattn.hf
    from treeattn.hf.testing import tiny_model

    model = tiny_model("llama", seed=seed)
    treeattn.hf.generate(model, torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, pad_token_id=0)  # warm-up
    rows = []
    for name in TRACES:
        without, plain = run_model_trace(name, model, False, seed)
        with_cache, served = run_model_trace(name, model, True, seed)
        if served != plain:
            raise AssertionError(f"{name}: treeattn.hf.generate with a prefix cache changed the outputs")
        rows += [without, with_cache]
    return rows


def summary_lines(rows: list[dict], timed: list[dict] = ()) -> list[dict]:
    """The suite summary's lines (see summary.py): per trace, prompt tokens computed with the token-granular
    cache against none and against page-granular matching; and the CPU wall time of the scaled-down trace on a
    tiny model with the cache against without (``timed``: :func:`model_rows`)."""
    by = {(r["trace"], r["matching"]): r for r in rows}
    on_model = {(r["trace"], r["prefix_cache"]): r for r in timed}
    lines = []
    for name in TRACES:
        none, token, page = (by.get((name, m)) for m in ("none", "token", "page"))
        if none and token and page:
            lines.append({
                "case": name, "measure": f"prompt tokens computed, prefix cache of {token['num_pages']} pages",
                "value": f"{token['prefill_tokens']} of {none['prefill_tokens']} ({token['hit_rate']:.1%} hit)",
                "vs": f"page-granular matching: {page['prefill_tokens']} ({page['hit_rate']:.1%} hit); "
                      "hit rate against pool size: prefix_eviction.png"})
        cached, plain = on_model.get((name, True)), on_model.get((name, False))
        if cached and plain:
            lines.append({
                "case": f"{name} (scaled down, {cached['calls']} calls)",
                "measure": f"CPU wall time of treeattn.hf.generate, {MODEL}",
                "value": f"{cached['wall_s']:.2f} s with the prefix cache ({cached['prefill_tokens']} of "
                         f"{cached['prompt_tokens']} prompt tokens computed)",
                "vs": f"{plain['wall_s']:.2f} s without ({plain['prefill_tokens']} computed): "
                      f"{_speed(plain['wall_s'], cached['wall_s'])}; same outputs"})
    return lines


def _speed(before: float, after: float) -> str:
    ratio = before / max(after, 1e-9)
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


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
    timed = model_rows()
    common.print_table(rows, ["trace", "matching", "prompt_tokens", "prefill_tokens", "hit_rate", "host_s"])
    common.print_table(curve, ["trace", "num_pages", "hit_rate", "evicted_tokens", "failed_calls"])
    common.print_table(timed, ["trace", "prefix_cache", "calls", "prompt_tokens", "prefill_tokens", "wall_s"])
    if args.out:
        path = common.write_results(args.out, "prefix", {"env": common.environment(), "rows": rows, "curve": curve,
                                                         "model_rows": timed, "summary": summary_lines(rows, timed)})
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
