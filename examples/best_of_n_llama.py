"""Best-of-N sampling with a TreeKVCache: N branches sampled from one prompt, decoded together.

The prompt is prefilled once (through treeattn: ``plan([root], num_tokens=len(prompt))`` is causal attention
over the prompt), forked into N branches that each sample their own continuation; a branch that samples the
stop token (or reaches its length) is released and its pages return to the pool. Every branch's logits are
checked against the unmodified HF model run on that branch's full sequence, and the KV memory the shared
prompt saves against one cache per branch is printed.

    python examples/best_of_n_llama.py [--n 8] [--steps 24] [--prompt 45]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from llama_tree import TreeLlama, full_logits, make_model, memory_report, relative_error  # noqa: E402

STOP = 0  # token id that ends a branch


def best_of_n(n: int = 6, steps: int = 12, prompt_len: int = 21, *, page_size: int = 8, temperature: float = 1.0,
              max_tokens: list[int] | None = None, seed: int = 0) -> dict:
    """Run best-of-N; returns the branches, their recorded logits and the cache stats at the peak.
    Branch ``i`` stops at the stop token or after ``max_tokens[i]`` tokens (default ``steps``)."""
    model = make_model(seed)
    device = next(model.parameters()).device
    runner = TreeLlama(model, page_size=page_size, num_pages=1024)
    cache = runner.cache
    g = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (prompt_len,), generator=g).tolist()

    root = cache.add(0)  # an empty root: the prefill appends the whole prompt, as queries attending causally
    logits = runner.step(prompt, [root], num_tokens=prompt_len)
    cache_prompt_logits = logits
    leaves = cache.fork(root, n)
    cache.release(root)  # the branches keep the prompt alive
    limit = dict(zip(leaves, max_tokens or [steps] * n))
    branch = {leaf: {"tokens": [], "logits": [logits[-1]]} for leaf in leaves}
    peak = cache.stats()
    for _ in range(steps):
        if not leaves:
            break
        last = torch.stack([branch[leaf]["logits"][-1] for leaf in leaves])
        probs = torch.softmax(last.cpu() / temperature, dim=-1)
        picks = torch.multinomial(probs, 1, generator=g)[:, 0].tolist()
        alive = []
        for leaf, tok in zip(leaves, picks):
            branch[leaf]["tokens"].append(tok)
            if tok == STOP or len(branch[leaf]["tokens"]) >= limit[leaf]:
                cache.release(leaf)  # finished: its own pages go back to the pool
            else:
                alive.append(leaf)
        leaves = alive
        if not leaves:
            break
        out = runner.step([branch[leaf]["tokens"][-1] for leaf in leaves], leaves)
        for leaf, row in zip(leaves, out):
            branch[leaf]["logits"].append(row)
        stats = cache.stats()
        if stats["pages_if_unshared"] > peak["pages_if_unshared"]:
            peak = stats
    for leaf in leaves:
        cache.release(leaf)
    assert cache.stats()["nodes"] == 0
    assert cache.stats()["pages_free"] == cache.num_pages, "every page returns to the pool"
    return {"prompt": prompt, "prompt_logits": cache_prompt_logits, "branches": list(branch.values()), "peak": peak,
            "model": model, "device": device}


def check(result: dict, tol: float = 1e-4) -> float:
    """Every branch's logits equal the HF model's on its full sequence; returns the worst relative error."""
    model, prompt = result["model"], result["prompt"]
    worst = relative_error(result["prompt_logits"], full_logits(model, prompt))
    for b in result["branches"]:
        fed = b["tokens"][: len(b["logits"]) - 1]  # tokens whose logits were computed (the last may be STOP)
        ref = full_logits(model, prompt + fed)[len(prompt) - 1 :]
        got = torch.stack(b["logits"])
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = max(worst, relative_error(got, ref))
    assert worst < tol, f"tree-decoded logits differ from the model's: relative error {worst:.2e}"
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=45)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = best_of_n(args.n, args.steps, args.prompt, seed=args.seed)
    worst = check(result)
    model = result["model"]
    print(f"best-of-{args.n} over a {args.prompt}-token prompt, {args.steps} steps (Llama {sum(p.numel() for p in model.parameters())} params, random init)")
    for i, b in enumerate(result["branches"]):
        lp = torch.log_softmax(torch.stack(b["logits"][: len(b["tokens"])]), -1)
        score = lp[torch.arange(len(b["tokens"])), torch.tensor(b["tokens"])].mean().item()
        b["score"] = score
        print(f"  branch {i}: {len(b['tokens']):2d} tokens, mean logprob {score:7.3f}{'  (stopped)' if b['tokens'][-1] == STOP else ''}")
    best = max(range(len(result["branches"])), key=lambda i: result["branches"][i]["score"])
    print(f"best branch: {best}")
    print(f"check: every branch's logits match the HF model on its full sequence (worst relative error {worst:.1e})")
    print("at the peak: " + memory_report(result["peak"]))


if __name__ == "__main__":
    main()
