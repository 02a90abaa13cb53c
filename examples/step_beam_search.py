"""Step-level beam search with treeattn.hf.TreeSearch: expand the best nodes a reasoning step at a time.

Each round expands each of the best ``--keep`` nodes into ``--samples`` candidate steps (a step ends at the
delimiter, a two-token stand-in for "\\n\\n", or after ``--step-tokens`` tokens); all candidates of a round are
decoded together, one batched step at a time. A scoring callback ranks the candidates (the mean
log-probability stands in for a reward model); the best are kept, the others released. A tiny random-init HF
model runs on CPU (``--family llama|qwen2|deepseek_v3``, no download).

The example checks itself: every kept node's log-probabilities equal the model's own on its full token path
(teacher-forced), and releasing the tree returns every page. It prints the tree, the KV memory saved and the
number of batched decode steps against one generate call per expanded node.

    python examples/step_beam_search.py [--rounds 3] [--keep 2] [--samples 4] [--step-tokens 8]
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU interpreter

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import teacher_forced_logprobs, tiny_model  # noqa: E402
from treeattn.testing import assert_close  # noqa: E402

DELIMITER = [5, 7]  # the step delimiter, as token ids


def mean_logprob(search, node) -> float:
    """The scoring callback: a reward model would go here."""
    return search.logprobs(node).mean().item()


def solo_forwards(search, groups) -> int:
    """Forward passes the round would take with one ``generate`` call per node: a prefill of the node's path,
    then one step per token of its longest child but the last."""
    return sum(max(len(search.new_tokens(c)) for c in g) for g in groups)


def step_beam_search(family="llama", rounds=3, keep=2, samples=4, step_tokens=8, prompt_length=24, seed=0,
                     score=mean_logprob):
    model = tiny_model(family, seed=seed)
    search = treeattn.hf.TreeSearch(model, page_size=8)
    prompt = torch.randint(8, model.config.vocab_size, (prompt_length,), generator=torch.Generator().manual_seed(seed))
    root = search.add_prompt(prompt)
    beams, solo, peak = [root], 0, search.stats()
    for r in range(rounds):
        generators = [torch.Generator().manual_seed(1000 * seed + 10 * r + i) for i in range(len(beams))]
        groups = search.expand(beams, samples, max_new_tokens=step_tokens, stop=[DELIMITER], generator=generators)
        solo += solo_forwards(search, groups)
        peak = max(peak, search.stats(), key=lambda s: s["tokens_if_unshared"])
        ranked = sorted((c for g in groups for c in g), key=lambda c: score(search, c), reverse=True)
        beams = ranked[:keep]
        for c in ranked[keep:]:
            search.release(c)
    return search, model, root, beams, solo, peak


def check(search, model, beams) -> None:
    """Every kept node's log-probabilities (and its ancestors') are the model's own, teacher-forced."""
    seen = set()
    for node in beams:
        while node is not None and node not in seen and search.parent(node) is not None:
            seen.add(node)
            new = search.new_tokens(node)
            assert_close(search.logprobs(node), teacher_forced_logprobs(model, search.tokens(node), len(new)),
                         torch.float32, what=f"logprobs of node {node}")
            node = search.parent(node)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "deepseek_v3"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--step-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    search, model, root, beams, solo, peak = step_beam_search(
        args.family, args.rounds, args.keep, args.samples, args.step_tokens, seed=args.seed)
    check(search, model, beams)
    print(f"step-level beam search: {args.rounds} rounds, best {args.keep} nodes x {args.samples} samples "
          f"({args.family}, random init); delimiter {DELIMITER}")
    print(search.format_tree(root))
    print("best: " + ", ".join(f"node {b} (mean logprob {mean_logprob(search, b):.3f})" for b in beams))
    s = search.stats()
    print(f"KV now: {s['tokens_stored']} tokens stored for {s['leaves']} leaves of {s['tokens_if_unshared']} tokens; "
          f"{100 * s['memory_saved']:.0f}% of the pages saved vs one cache per leaf")
    print(f"KV at the widest round: {peak['tokens_stored']} tokens stored vs {peak['tokens_if_unshared']} "
          f"({100 * peak['memory_saved']:.0f}% of the pages saved)")
    print(f"forward passes: {1 + s['decode_steps']} "
          f"(the prompt's prefill and {s['decode_steps']} batched decode steps); "
          f"one generate call per expanded node: {solo}")
    print("check: every kept node's logprobs match the model's own on its full token path")
    for node in search.nodes():
        search.release(node)
    assert search.stats()["pages_used"] == 0, "every page returns to the pool"


if __name__ == "__main__":
    main()
