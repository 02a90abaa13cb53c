"""Self-consistency with treeattn.hf.TreeSearch: 16 samples from one prompt, decoded together, majority vote.

The prompt is prefilled once; its 16 samples fork from it and are decoded in one batch, each until it emits
the answer delimiter or reaches ``--new-tokens``; the "answer" of a sample is its last token, and the most
common answer wins. A tiny random-init HF model runs on CPU (``--family llama|qwen2|deepseek_v3``, no
download).

The example checks itself: every sample's log-probabilities equal the model's own on its full token path
(teacher-forced), and releasing the tree returns every page. It prints the tree, the vote, the KV memory saved
and the number of batched decode steps against one generate call per sample.

    python examples/self_consistency.py [--samples 16] [--new-tokens 12]
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU interpreter

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import teacher_forced_logprobs, tiny_model  # noqa: E402
from treeattn.testing import assert_close  # noqa: E402

DELIMITER = [9]  # ends a sample's answer (token ids)


def self_consistency(family="llama", samples=16, new_tokens=12, prompt_length=32, seed=0, temperature=0.9):
    model = tiny_model(family, seed=seed)
    search = treeattn.hf.TreeSearch(model, page_size=8)
    prompt = torch.randint(10, model.config.vocab_size, (prompt_length,), generator=torch.Generator().manual_seed(seed))
    root = search.add_prompt(prompt)
    kids = search.expand([root], samples, max_new_tokens=new_tokens, stop=[DELIMITER], temperature=temperature,
                         generator=torch.Generator().manual_seed(seed + 1))[0]
    answers = Counter(int(search.new_tokens(k)[-1]) for k in kids)
    return search, model, root, kids, answers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "deepseek_v3"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    search, model, root, kids, answers = self_consistency(args.family, args.samples, args.new_tokens, seed=args.seed)
    for k in kids:
        new = search.new_tokens(k)
        assert_close(search.logprobs(k), teacher_forced_logprobs(model, search.tokens(k), len(new)), torch.float32,
                     what=f"logprobs of sample {k}")
    answer, votes = answers.most_common(1)[0]
    print(f"self-consistency: {args.samples} samples of up to {args.new_tokens} tokens ({args.family}, random init)")
    print(search.format_tree(root))
    print(f"vote on the last token: {dict(answers.most_common())} -> answer {answer} ({votes} of {args.samples})")
    s = search.stats()
    print(f"KV: {s['tokens_stored']} tokens stored for {s['leaves']} samples of {s['tokens_if_unshared']} tokens; "
          f"{100 * s['memory_saved']:.0f}% of the pages saved vs one cache per sample")
    longest = max(len(search.new_tokens(k)) for k in kids)
    print(f"forward passes: {1 + s['decode_steps']} (one prefill and {s['decode_steps']} batched decode steps); "
          f"one generate call per sample: {sum(len(search.new_tokens(k)) for k in kids)} "
          f"(longest sample {longest} tokens)")
    print("check: every sample's logprobs match the model's own on its full token path")
    for node in search.nodes():
        search.release(node)
    assert search.stats()["pages_used"] == 0, "every page returns to the pool"


if __name__ == "__main__":
    main()
