"""One rank of the tensor-parallel check (tests/test_hf_tensor_parallel.py starts two of these on CPU with gloo).

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r CUDA_VISIBLE_DEVICES= python tests/tp_worker.py OUT LLAMA DSV3

The ranks meet through a file store in ``OUT`` (no port to pick). Each loads the saved tiny models with
transformers' tensor parallelism and runs every case twice under the same TP, ``model.generate`` and
``treeattn.hf.generate`` (every rank reseeded the same before each), plus a ``TreeSearch`` expansion, then
``examples/tp_generate.py``; it writes what each returned to ``OUT/rank<r>.pt`` for the test to compare (within
a rank: treeattn against HF; across ranks: the same tokens). A case that raises records its traceback instead,
so the ranks stay in step and the test shows the error.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback

import torch
import transformers
from transformers.distributed import DistributedConfig

import treeattn.hf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import tp_generate  # noqa: E402

# DeepSeek-V3's own plan leaves attention replicated (it shards the MLP and the experts); this one also splits
# its heads the way DeepSeek-V2's plan does (the latent projection kv_a_proj_with_mqa stays whole on every rank).
MLA_HEADS_SPLIT = {
    "model.layers.*.self_attn.q_b_proj": "colwise",
    "model.layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
    "model.layers.*.self_attn.kv_b_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
}

PROMPTS = torch.tensor([[0, 0, 5, 17, 33, 2, 9], [11, 4, 60, 7, 21, 3, 8]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
GENERATE_CASES = {
    "greedy": dict(max_new_tokens=4, do_sample=False),
    "sampling": dict(max_new_tokens=4, do_sample=True, top_k=20, num_return_sequences=3),
    "beams": dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True),
}


def _both(model, kwargs: dict) -> dict:
    out = {}
    for name, run in (("hf", model.generate), ("tree", lambda *a, **k: treeattn.hf.generate(model, *a, **k))):
        torch.manual_seed(1234)
        result = run(PROMPTS, attention_mask=MASK, pad_token_id=0, return_dict_in_generate=True, **kwargs)
        out[name] = result.sequences
        if getattr(result, "sequences_scores", None) is not None:
            out[name + "_scores"] = result.sequences_scores
    return out


def _search(model) -> dict:
    search = treeattn.hf.TreeSearch(model)
    root = search.add_prompt(PROMPTS[1])
    children = search.expand([root], 3, max_new_tokens=3, generator=torch.Generator().manual_seed(7))[0]
    grandchildren = search.expand(children[:2], 2, max_new_tokens=2, generator=torch.Generator().manual_seed(8))
    nodes = search.nodes()
    return {
        "nodes": nodes,
        "parents": [search.parent(n) for n in nodes],
        "tokens": [search.tokens(n) for n in nodes],
        "logprobs": [search.logprobs(n) for n in nodes if search.parent(n) is not None],
        "grandchildren": grandchildren,
    }


def _cases(llama: str, dsv3: str):
    auto = dict(distributed_config=DistributedConfig(tp_plan="auto"))
    yield "llama", llama, auto, GENERATE_CASES, True
    yield "dsv3", dsv3, auto, {"greedy": GENERATE_CASES["greedy"]}, False
    split = dict(distributed_config=DistributedConfig(tp_plan=MLA_HEADS_SPLIT))
    yield "dsv3_split", dsv3, split, {k: GENERATE_CASES[k] for k in ("greedy", "sampling")}, True


def main(out_dir: str, llama: str, dsv3: str) -> None:
    rank = int(os.environ["RANK"])
    # transformers uses a process group that already exists (the same one torchrun's env:// would give)
    torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=rank,
                                         world_size=int(os.environ["WORLD_SIZE"]))
    results: dict = {}
    for family, path, load, cases, search in _cases(llama, dsv3):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **load).eval()
            spec = treeattn.hf.TreeCache(model, num_pages=4).spec
            results[f"{family}/heads"] = (spec.num_qo_heads, spec.num_kv_heads)
        except Exception:
            results[f"{family}/load"] = traceback.format_exc()
            continue
        for case, kwargs in cases.items():
            try:
                results[f"{family}/{case}"] = _both(model, kwargs)
            except Exception:
                results[f"{family}/{case}"] = traceback.format_exc()
        if search:
            try:
                results[f"{family}/search"] = _search(model)
            except Exception:
                results[f"{family}/search"] = traceback.format_exc()
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            tp_generate.main(["--samples", "2", "--new-tokens", "3", "--prompt", "9"])
        results["example"] = printed.getvalue()
    except Exception:
        results["example"] = "Traceback " + traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
