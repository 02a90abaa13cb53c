"""Beam search with a TreeKVCache: beams fork where they pick several continuations and die where they pick none.

Each step appends every beam's pending token (one KV write launch per layer for all beams), plans the step
from the cache's tree and runs the model with treeattn attention; the best ``width`` (beam, token) pairs
survive. A beam chosen ``c > 1`` times forks into ``c`` children (they share its whole history; the first to
continue a half-filled page does so in place, the rest copy that one page), a beam chosen once continues
as it is, a beam not chosen is released. Every surviving beam's logits and score are checked against the
unmodified HF model run on the beam's full sequence, and the memory saved against per-beam caches is printed.

    python examples/beam_search_llama.py [--width 4] [--steps 16] [--prompt 29]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from llama_tree import TreeLlama, full_logits, make_model, memory_report, relative_error  # noqa: E402


def beam_search(width: int = 4, steps: int = 8, prompt_len: int = 13, *, page_size: int = 4, seed: int = 0) -> dict:
    """Run beam search; returns the final beams (tokens, score, logits history) and the peak cache stats."""
    model = make_model(seed)
    runner = TreeLlama(model, page_size=page_size, num_pages=1024)
    cache = runner.cache
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()

    root = cache.add(0)
    logits = runner.step(prompt, [root], num_tokens=prompt_len)
    # A beam: its node (holding every token but the pending last one), tokens, score and logits history.
    beams = [{"node": root, "tokens": [], "score": 0.0, "logits": [logits[-1]]}]
    peak = cache.stats()
    for step in range(steps + 1):
        last = torch.stack([b["logits"][-1] for b in beams]).cpu()
        logprobs = torch.log_softmax(last, dim=-1)
        totals = torch.tensor([b["score"] for b in beams])[:, None] + logprobs
        top = torch.topk(totals.reshape(-1), width)
        chosen: dict[int, list[tuple[int, float]]] = {}
        for flat, score in zip(top.indices.tolist(), top.values.tolist()):
            parent, token = divmod(flat, logprobs.shape[1])
            chosen.setdefault(parent, []).append((token, score))
        new_beams = []
        for i, beam in enumerate(beams):
            picks = chosen.get(i, [])
            if not picks:
                cache.release(beam["node"])  # nothing continues it: free what only it held
                continue
            nodes = [beam["node"]] if len(picks) == 1 else cache.fork(beam["node"], len(picks))
            if len(picks) > 1:
                cache.release(beam["node"])  # the children keep its tokens alive
            for node, (token, score) in zip(nodes, picks):
                new_beams.append({"node": node, "tokens": beam["tokens"] + [token], "score": score,
                                  "logits": list(beam["logits"])})
        beams = new_beams
        if step == steps:
            break
        out = runner.step([b["tokens"][-1] for b in beams], [b["node"] for b in beams])
        for beam, row in zip(beams, out):
            beam["logits"].append(row)
        stats = cache.stats()
        if stats["pages_if_unshared"] >= peak["pages_if_unshared"]:
            peak = stats
    final = cache.stats()
    for beam in beams:
        cache.release(beam["node"])
    assert cache.stats()["pages_free"] == cache.num_pages, "every page returns to the pool"
    return {"prompt": prompt, "beams": beams, "peak": peak, "final": final, "model": model}


def check(result: dict, tol: float = 1e-4) -> float:
    """Each final beam's logits history and score equal the HF model's on its full sequence."""
    model, prompt = result["model"], result["prompt"]
    worst = 0.0
    for beam in result["beams"]:
        tokens = beam["tokens"]
        ref = full_logits(model, prompt + tokens[:-1])[len(prompt) - 1 :]
        got = torch.stack(beam["logits"])
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = max(worst, relative_error(got, ref))
        lp = torch.log_softmax(ref.cpu(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()
        assert abs(lp - beam["score"]) < 1e-3 * max(1.0, abs(lp)), (lp, beam["score"])
    assert worst < tol, f"tree-decoded logits differ from the model's: relative error {worst:.2e}"
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=29)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = beam_search(args.width, args.steps, args.prompt, seed=args.seed)
    worst = check(result)
    print(f"beam search, width {args.width}, {args.steps} steps over a {args.prompt}-token prompt (random-init Llama)")
    for i, beam in enumerate(sorted(result["beams"], key=lambda b: -b["score"])):
        print(f"  beam {i}: score {beam['score']:8.3f}  tokens {beam['tokens']}")
    print(f"check: every beam's logits and score match the HF model on its full sequence (worst relative error {worst:.1e})")
    print("at the end:  " + memory_report(result["final"]))
    print("at the peak: " + memory_report(result["peak"]))


if __name__ == "__main__":
    main()
