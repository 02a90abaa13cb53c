"""Beam search through treeattn.hf.generate: beams fork where HF keeps several continuations of one beam and
are released where it drops them, so their common history is stored once.

A tiny random-init HF model (CPU, fp32, no download; ``--family llama|qwen2|deepseek_v3``) runs HF's own beam
search (``num_beams``, its beam scores and stopping) over a left-padded batch of two prompts of different
lengths through ``treeattn.hf.generate``. The example checks itself: the sequences and scores are those
``model.generate`` returns, and it prints the beams and the KV memory against ``model.generate``'s default cache.

    python examples/beam_search.py [--beams 8] [--new-tokens 16] [--prompts 29 17] [--family llama]
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU interpreter

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import memory_report, tiny_model  # noqa: E402
from treeattn.testing import assert_close  # noqa: E402

PAD = 0


def left_padded(lengths, vocab: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


def beam_search(family: str = "llama", beams: int = 8, new_tokens: int = 16, prompts=(29, 17), seed: int = 0):
    """Returns (treeattn's output, model.generate's output, the prompt batch)."""
    model = tiny_model(family, seed=seed)
    ids, mask = left_padded(prompts, model.config.vocab_size, torch.Generator().manual_seed(seed + 1))
    kwargs = dict(attention_mask=mask, num_beams=beams, num_return_sequences=beams, max_new_tokens=new_tokens,
                  pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    out = treeattn.hf.generate(model, ids, **kwargs)  # the one line that changes
    ref = model.generate(ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences), "treeattn.hf.generate differs from model.generate"
    assert_close(out.sequences_scores, ref.sequences_scores, torch.float32, what="beam scores")
    return out, ref, ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "deepseek_v3"])
    parser.add_argument("--beams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, nargs="+", default=[29, 17])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out, ref, ids = beam_search(args.family, args.beams, args.new_tokens, tuple(args.prompts), args.seed)
    print(f"beam search, {args.beams} beams, {args.new_tokens} new tokens, prompts of {args.prompts} tokens "
          f"(left-padded batch; {args.family}, random init)")
    for i, (row, score) in enumerate(zip(out.sequences[:, ids.shape[1]:], out.sequences_scores)):
        print(f"  prompt {i // args.beams} beam {i % args.beams}: score {score:8.4f}  {row.tolist()}")
    print("check: the same sequences and beam scores as model.generate")
    print(memory_report(out.cache, ref.cache))


if __name__ == "__main__":
    main()
