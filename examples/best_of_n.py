"""Best-of-N sampling through treeattn.hf.generate: N samples of one prompt, the prompt stored and read once.

A tiny random-init HF model (CPU, fp32, no download; ``--family llama|qwen2|deepseek_v3``) samples N
continuations with HF's own sampling (``do_sample``, ``num_return_sequences``) through
``treeattn.hf.generate``; the best sample by mean log-probability wins. The example checks itself: the
sequences are exactly those ``model.generate`` returns under the same seed, and it prints the KV memory
against ``model.generate``'s default cache.

    python examples/best_of_n.py [--n 8] [--new-tokens 24] [--prompt 45] [--family llama]
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU interpreter

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import memory_report, tiny_model  # noqa: E402

PAD = 0


def sequence_scores(model, out, prompt_length: int) -> torch.Tensor:
    """Mean raw log-probability of each sequence's new tokens, up to and including its EOS."""
    logprobs = model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)
    new = out.sequences[:, prompt_length:]
    eos = model.generation_config.eos_token_id
    ended = torch.zeros_like(new, dtype=torch.bool) if eos is None else torch.isin(new, torch.tensor(eos))
    valid = (ended.cumsum(-1) - ended.long()) == 0  # no EOS before this token
    return (logprobs * valid).sum(-1) / valid.sum(-1)


def best_of_n(family: str = "llama", n: int = 8, new_tokens: int = 24, prompt_length: int = 45, seed: int = 0):
    """Returns (treeattn's output, model.generate's output, mean log-probability per sample, the model)."""
    model = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_length), generator=g)
    kwargs = dict(do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens, pad_token_id=PAD,
                  return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(seed)
    out = treeattn.hf.generate(model, prompt, **kwargs)  # the one line that changes
    torch.manual_seed(seed)
    ref = model.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences), "treeattn.hf.generate differs from model.generate"
    return out, ref, sequence_scores(model, out, prompt_length), model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "deepseek_v3"])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=45)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out, ref, scores, model = best_of_n(args.family, args.n, args.new_tokens, args.prompt, args.seed)
    print(f"best-of-{args.n}: {args.new_tokens} new tokens after a {args.prompt}-token prompt "
          f"({args.family}, {sum(p.numel() for p in model.parameters())} parameters, random init)")
    for i, (row, score) in enumerate(zip(out.sequences[:, args.prompt:], scores)):
        print(f"  sample {i}: mean logprob {score:7.3f}  {row.tolist()}")
    print(f"best sample: {int(scores.argmax())}")
    print("check: the same sequences as model.generate with the same seed")
    print(memory_report(out.cache, ref.cache))


if __name__ == "__main__":
    main()
