"""Tensor-parallel generation through treeattn.hf: one model sharded across processes by transformers' tp_plan.

    torchrun --nproc_per_node=2 examples/tp_generate.py               # CPU: gloo; GPUs: NCCL, one per process
    torchrun --nproc_per_node=2 examples/tp_generate.py --model PATH  # a checkpoint of your own (folder or hub id)
    python examples/tp_generate.py                                    # one process, nothing sharded

Every rank loads the model with ``from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"))``
(``tp_plan="auto"`` in older transformers): its attention holds ``H_q / tp`` query heads and ``H_kv / tp`` KV
heads, and its TreeCache stores those KV heads only. Every rank runs the same
``treeattn.hf.generate`` call with the same seed, so HF's sampling draws the same tokens on every rank (the
logits are gathered whole on each). Without ``--model`` it uses a tiny random-init Llama (no download). The
example checks itself: the sequences are those ``model.generate`` returns under the same sharding and seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on the CPU interpreter

import transformers  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import tiny_model  # noqa: E402

PAD = 0


def load(model: str | None, seed: int):
    """The model, sharded across the ranks when there is more than one (``torchrun`` sets ``WORLD_SIZE``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if model is None:
            return tiny_model("llama", seed=seed)
        return transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group()  # torchrun's env://: gloo on CPU, NCCL on GPUs
    tensor_parallel = DistributedConfig(tp_plan="auto")  # the model's own plan, tp_size = WORLD_SIZE
    if model is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(model, distributed_config=tensor_parallel).eval()
    # The tiny model goes through a checkpoint, as a real one would: rank 0 writes it, every rank loads its shard.
    rank = torch.distributed.get_rank()
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    torch.distributed.broadcast_object_list(folder)
    try:
        if rank == 0:
            tiny_model("llama", seed=seed).save_pretrained(folder[0])
        torch.distributed.barrier()
        return transformers.AutoModelForCausalLM.from_pretrained(folder[0], distributed_config=tensor_parallel).eval()
    finally:
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(folder[0], ignore_errors=True)


def tp_generate(model, samples: int, new_tokens: int, prompt_length: int, seed: int):
    """(treeattn's output, model.generate's output) for ``samples`` samples of one random prompt."""
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_length), generator=g).to(model.device)
    kwargs = dict(do_sample=True, num_return_sequences=samples, max_new_tokens=new_tokens, pad_token_id=PAD,
                  return_dict_in_generate=True)
    torch.manual_seed(seed)  # the same seed on every rank keeps their sampling in lockstep
    out = treeattn.hf.generate(model, prompt, **kwargs)
    torch.manual_seed(seed)
    ref = model.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences), "treeattn.hf.generate differs from model.generate"
    return out, ref


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint folder or hub id (default: a tiny random Llama)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = load(args.model, args.seed)
    out, _ = tp_generate(model, args.samples, args.new_tokens, args.prompt, args.seed)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    text = model.config.get_text_config(decoder=True)
    spec, stats = out.cache.spec, out.cache.stats()
    print(f"rank {rank} of {world}: {spec.num_qo_heads} of {text.num_attention_heads} query heads, "
          f"{spec.num_kv_heads} of "
          f"{getattr(text, 'num_key_value_heads', None) or text.num_attention_heads} KV heads; KV in use "
          f"{stats['bytes_used'] / 1024:.1f} KiB ({stats['tokens_stored']} tokens stored for "
          f"{stats['tokens_if_unshared']} in {args.samples} samples)", flush=True)
    if rank == 0:
        for i, row in enumerate(out.sequences[:, args.prompt:]):
            print(f"  sample {i}: {row.tolist()}")
        print(f"check: the same sequences as model.generate under the same sharding ({world} process"
              f"{'es' if world > 1 else ''}) and seed")
    out.cache.release()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
