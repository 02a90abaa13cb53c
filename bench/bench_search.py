"""Step-level beam search with ``treeattn.hf.TreeSearch`` against one ``model.generate`` call per expanded node.

Width 8, depth 4 on the benchmarks' small random-init Llama: round 1 samples 8 steps from the prompt, every
later round expands each of the 8 best nodes (mean log-probability) into 4 candidate steps and keeps the best
8; a step ends at a delimiter token or after ``--step-tokens`` tokens. The baseline does the same expansions
with its own ``model.generate`` call per node (the node's whole path as the prompt, ``num_return_sequences`` =
the node's children, as many new tokens as its longest child), which is what a search loop over plain
``generate`` runs.

Reported: forward passes (TreeSearch: one prefill and its batched decode steps), prompt tokens prefilled, and
KV bytes — TreeSearch's pages at the peak against the baseline's caches of one round held together (its
largest round) and its largest single call. On a GPU also wall time of both.

    python bench/bench_search.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from bench_hf import model_info, peak_pages, small_model, timed  # noqa: E402

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import cache_bytes  # noqa: E402

PAGE_SIZE = 16
DELIMITER = 5


def tree_search(model, prompt, width: int, depth: int, samples: int, step_tokens: int, seed: int = 0):
    """Runs the search; returns (the search, [(node, its children's token counts) per round], peak pages)."""
    search = treeattn.hf.TreeSearch(model, page_size=PAGE_SIZE)
    peaks, handle = peak_pages(model)
    rounds = []
    try:
        beams = [search.add_prompt(prompt)]
        for r in range(depth):
            k = width if r == 0 else samples
            gens = [torch.Generator().manual_seed(1000 * seed + 100 * r + i) for i in range(len(beams))]
            groups = search.expand(beams, k, max_new_tokens=step_tokens, stop=[[DELIMITER]], generator=gens)
            rounds.append([(b, [len(search.new_tokens(c)) for c in g], len(search.tokens(b)))
                           for b, g in zip(beams, groups)])
            ranked = sorted((c for g in groups for c in g), key=lambda c: search.logprobs(c).mean().item(),
                            reverse=True)
            beams = ranked[:width]
            for c in ranked[width:]:
                search.release(c)
    finally:
        handle.remove()
    return search, rounds, peaks[0]


def per_node_generate(model, search, rounds) -> dict:
    """The same expansions, one model.generate call per node: forward passes, prefilled tokens, KV bytes."""
    forwards = [0]
    handle = model.base_model.register_forward_pre_hook(lambda *a, **k: forwards.__setitem__(0, forwards[0] + 1))
    calls, prefilled, round_bytes, largest = 0, 0, [], 0
    try:
        for expansions in rounds:
            held = 0
            for node, lengths, path_length in expansions:
                device = next(model.parameters()).device
                ids = search.tokens(node)[None].to(device) if node in search.nodes() else None
                if ids is None:  # released since: any path of the same length costs the same
                    ids = torch.randint(8, model.config.vocab_size, (1, path_length), device=device)
                new = max(lengths)
                out = model.generate(ids, do_sample=True, num_return_sequences=len(lengths), max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True)
                calls += 1
                prefilled += ids.shape[1]
                size = cache_bytes(out.cache)
                held += size
                largest = max(largest, size)
            round_bytes.append(held)
    finally:
        handle.remove()
    return {"calls": calls, "forwards": forwards[0], "prefilled_tokens": prefilled, "round_kv_bytes": max(round_bytes),
            "largest_call_kv_bytes": largest}


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--step-tokens", type=int, default=64 if on_gpu else 6)
    parser.add_argument("--prompt", type=int, default=512 if on_gpu else 64)
    args = parser.parse_args(argv)
    model = small_model()
    prompt = torch.randint(8, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    if on_gpu:  # warm-up
        tree_search(model, prompt, 2, 2, 2, 4)
    (search, rounds, peak), tree_s = timed(
        lambda: tree_search(model, prompt, args.width, args.depth, args.samples, args.step_tokens), on_gpu)
    base, base_s = timed(lambda: per_node_generate(model, search, rounds), on_gpu)
    s = search.stats()
    row = {
        "search": f"width {args.width}, depth {args.depth}",
        "prompt": args.prompt,
        "step_tokens": args.step_tokens,
        "expanded_nodes": sum(len(r) for r in rounds),
        "tree_forwards": 1 + s["decode_steps"],
        "tree_decode_steps": s["decode_steps"],
        "tree_prefilled_tokens": args.prompt,
        "tree_kv_peak_bytes": peak * s["bytes_per_page"],
        "generate_calls": base["calls"],
        "generate_forwards": base["forwards"],
        "generate_prefilled_tokens": base["prefilled_tokens"],
        "generate_round_kv_bytes": base["round_kv_bytes"],
        "generate_largest_call_kv_bytes": base["largest_call_kv_bytes"],
    }
    row["forwards_ratio"] = row["generate_forwards"] / row["tree_forwards"]
    row["kv_ratio"] = row["generate_round_kv_bytes"] / row["tree_kv_peak_bytes"]
    if on_gpu:
        row["tree_s"], row["generate_s"] = tree_s, base_s
    common.print_table([row], [k for k in row if k != "search"])
    summary = [
        {"case": row["search"], "measure": "forward passes", "value": row["tree_forwards"],
         "vs": f"{row['forwards_ratio']:.1f}x fewer than one generate call per node ({row['generate_forwards']})"},
        {"case": row["search"], "measure": "KV bytes at the peak", "value": f"{row['tree_kv_peak_bytes'] / 1e6:.2f} MB",
         "vs": f"{row['kv_ratio']:.1f}x fewer than a round of per-node generate calls "
               f"({row['generate_round_kv_bytes'] / 1e6:.2f} MB)"},
    ]
    if on_gpu:
        summary.append({"case": row["search"], "measure": "wall time (GPU)", "value": f"{tree_s:.2f} s",
                        "vs": f"{base_s / tree_s:.2f}x faster than per-node generate ({base_s:.2f} s)"})
    payload = {"env": common.environment(), "model": model_info(model, PAGE_SIZE), "rows": [row], "summary": summary}
    print(f"wrote {common.write_results(args.out, 'search', payload)}")
    for node in search.nodes():
        search.release(node)


if __name__ == "__main__":
    main()
