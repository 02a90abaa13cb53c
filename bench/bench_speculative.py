"""Speculative decoding on text that repeats itself: target forward passes per generated token, accepted draft
tokens per verify step and CPU wall time of ``treeattn.hf.generate(speculative=...)`` against plain greedy
``model.generate`` and HF's own speculation (``prompt_lookup_num_tokens=``: a chain, batch 1 only;
``assistant_model=``), on the same prompts. Every output is checked token for token against plain greedy
``model.generate`` (a correctness check: a mismatch makes the benchmark fail).

The model: random-init models do not copy text, so the benchmark trains its own. A tiny Llama (2 layers,
hidden 64, 64 tokens) learns, on CPU in about a minute, a synthetic copy/induction task: half the sequences
repeat one random span, half string a few random "steps" (spans of 4-8 tokens, some starting like an earlier
one) in random order, restating each many times. Both kinds are new in every sequence, so the model can only
continue them by copying from its context (an induction head), as a chain of thought restates its own steps.
The weights are cached in ``<out>/spec_model/`` (ignored by git) so that reruns skip training; the draft model
is the same run's checkpoint at two thirds of training (same size as the target: it shows what a weaker model
drafts, not a cheaper one). The prompts are held-out sequences of restated steps; decoding is greedy.

Forward passes are counted by a forward hook on the target (prefill included), the same count for every
method; ``model.generate`` decodes ``T`` tokens in ``T`` forwards. Accepted draft tokens per verify step:
HF's ``n_matches`` per assisted-decoding iteration, treeattn's per row and step (``TreeCache.count_draft``).
Wall times are host times on one thread of a shared CPU (noisy; treeattn's attention runs its fp32 reference
on CPU).

    python bench/bench_speculative.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.generation import candidate_generator

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import treeattn.hf  # noqa: E402
from treeattn.hf.cache import TreeCache  # noqa: E402

VOCAB = 64  # token 0 is padding and never appears in the data
TRAIN_LENGTH = 96
NUM_SPECULATIVE_TOKENS = 8
PROMPT_LENGTH = 40
NEW_TOKENS = TRAIN_LENGTH - PROMPT_LENGTH  # (positions stay within what the model was trained on)


# ---- the synthetic task ---------------------------------------------------------------------------------

def restated_steps(rng: np.random.Generator, length: int) -> list[int]:
    """3-5 random steps of 4-8 tokens (half of them after the first start with 1-2 tokens of an earlier step),
    restated in random order until ``length`` tokens."""
    steps: list[list[int]] = []
    for _ in range(int(rng.integers(3, 6))):
        step = rng.integers(1, VOCAB, int(rng.integers(4, 9))).tolist()
        if steps and rng.random() < 0.5:
            earlier = steps[int(rng.integers(len(steps)))]
            shared = int(rng.integers(1, 3))
            step = earlier[:shared] + step[shared:]
        steps.append(step)
    out: list[int] = []
    while len(out) < length:
        out += steps[int(rng.integers(len(steps)))]
    return out[:length]


def repeated_span(rng: np.random.Generator, length: int) -> list[int]:
    """One random span of 5-16 tokens, repeated until ``length`` tokens."""
    span = rng.integers(1, VOCAB, int(rng.integers(5, 17))).tolist()
    return (span * (length // len(span) + 1))[:length]


def training_batch(rng: np.random.Generator, batch: int, length: int = TRAIN_LENGTH) -> torch.Tensor:
    """``[batch, length]`` token ids: half repeated spans, half restated steps (in random order)."""
    return torch.tensor([(repeated_span if rng.random() < 0.5 else restated_steps)(rng, length)
                         for _ in range(batch)])


def prompts(num_prompts: int, seed: int, length: int = PROMPT_LENGTH) -> torch.Tensor:
    """``[num_prompts, length]`` held-out prompts of restated steps (a seed the training data does not use)."""
    rng = np.random.default_rng([seed, 1])
    return torch.tensor([restated_steps(rng, length) for _ in range(num_prompts)])


# ---- the model ------------------------------------------------------------------------------------------

def model_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)


def train(steps: int, seed: int, batch: int = 24, lr: float = 3e-3) -> tuple[dict, dict]:
    """Train the target for ``steps`` AdamW steps (one-cycle schedule); returns ``(state dicts, record)``: the
    target's and the draft's weights (the checkpoint after two thirds of the steps) and what training did."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    rng = np.random.default_rng([seed, 0])
    draft_at = (2 * steps) // 3
    states, losses = {}, []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        if step == draft_at:
            states["draft"] = {k: v.clone() for k, v in model.state_dict().items()}
        x = training_batch(rng, batch)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    states.setdefault("draft", {k: v.clone() for k, v in model.state_dict().items()})
    states["target"] = model.state_dict()
    tail = losses[-20:] or [float("nan")]
    record = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "draft_step": min(draft_at, steps),
              "train_s": round(time.perf_counter() - t0, 1), "final_loss": round(sum(tail) / len(tail), 3)}
    return states, record


def load_or_train(folder: Path | None, steps: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """``(target, draft, record)``: the weights cached in ``folder`` when they were trained with the same
    ``steps`` and ``seed``, else trained now (and cached when ``folder`` is given)."""
    record_path = folder / "training.json" if folder is not None else None
    record = None
    if record_path is not None and record_path.exists():
        cached = json.loads(record_path.read_text())
        if (cached.get("steps"), cached.get("seed")) == (steps, seed):
            record = dict(cached, cached=True)
            states = {name: torch.load(folder / f"{name}.pt", weights_only=True) for name in ("target", "draft")}
    if record is None:
        states, record = train(steps, seed)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for name, state in states.items():
                torch.save(state, folder / f"{name}.pt")
            record_path.write_text(json.dumps(record, indent=2))
        record = dict(record, cached=False)
    models = []
    for name in ("target", "draft"):
        model = transformers.LlamaForCausalLM(model_config())
        model.load_state_dict(states[name])
        models.append(model.eval())
    return models[0], models[1], record


# ---- measuring ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def forward_count(model: torch.nn.Module):
    """Counts ``model``'s forward calls (prefill included): ``with forward_count(m) as n: ...; n[0]``."""
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def _recording(orig, steps: list[int], at: int):
    """``orig`` (a method) that first appends its positional argument ``at`` (an accepted count) to ``steps``
    when it is the last one: a call with more (``count_draft``'s draft-model forwards, once per ``generate``)
    is no verify step."""

    def method(self, *args):
        if len(args) == at + 1:
            steps.append(int(args[at]))
        return orig(self, *args)

    return method


@contextlib.contextmanager
def accepted_per_step():
    """Records the accepted draft tokens of every verify step, HF's and treeattn's: ``with accepted_per_step()
    as steps: ...``. HF reports each assisted-decoding iteration's ``n_matches`` to its candidate generator;
    treeattn each row's verified tree to its cache's ``count_draft``."""
    steps: list[int] = []
    hooks = [(candidate_generator.PromptLookupCandidateGenerator, "update_candidate_strategy", 2),
             (candidate_generator.AssistedCandidateGenerator, "update_candidate_strategy", 2),
             (TreeCache, "count_draft", 1)]
    own = [(cls, name, cls.__dict__.get(name)) for cls, name, _ in hooks]  # None: inherited
    try:
        for cls, name, at in hooks:
            setattr(cls, name, _recording(getattr(cls, name), steps, at))
        yield steps
    finally:
        for cls, name, orig in own:
            if orig is None:
                delattr(cls, name)
            else:
                setattr(cls, name, orig)


def histogram(steps: list[int], size: int = NUM_SPECULATIVE_TOKENS + 1) -> list[int]:
    """How many verify steps accepted 0, 1, ..., ``size - 1`` draft tokens."""
    counts = [0] * size
    for n in steps:
        counts[min(n, size - 1)] += 1
    return counts


def _greedy(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


def _treeattn(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[torch.Tensor, int]:
    out = treeattn.hf.generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs)
    forwards = out.cache.stats()["forward_passes"]
    out.cache.release()
    return out.sequences, forwards


def methods(draft: torch.nn.Module, k: int = NUM_SPECULATIVE_TOKENS) -> dict:
    """name -> (batched, decode(model, ids, new_tokens) -> (sequences, cache forward count or None))."""
    # HF reads its assisted decoding's settings from the draft's generation config: a constant chain of k
    # tokens (no early exit on low draft confidence), like for like with treeattn's k-node trees.
    draft.generation_config.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=0.0)
    return {
        "model.generate": (True, lambda m, ids, n: (_greedy(m, ids, n), None)),
        "hf_prompt_lookup": (False, lambda m, ids, n: (_greedy(m, ids, n, prompt_lookup_num_tokens=k), None)),
        "treeattn_ngram": (True, lambda m, ids, n: _treeattn(m, ids, n, speculative="ngram",
                                                             num_speculative_tokens=k)),
        "hf_assisted": (False, lambda m, ids, n: (_greedy(m, ids, n, assistant_model=draft), None)),
        "treeattn_draft_model": (True, lambda m, ids, n: _treeattn(m, ids, n, speculative=draft,
                                                                   num_speculative_tokens=k)),
    }


def run(target, draft, ids: torch.Tensor, new_tokens: int, batch_sizes=(1, 8)) -> list[dict]:
    """One row per (method, batch size) the method serves; each decodes every prompt of ``ids`` greedily,
    ``batch`` prompts per call, and is checked token for token against plain greedy at the same batch size."""
    rows = []
    for batch in sorted({min(b, ids.shape[0]) for b in batch_sizes}):
        chunks = list(torch.split(ids, batch))
        reference = None
        for name, (batched, decode) in methods(draft).items():
            if batch > 1 and not batched:
                continue
            decode(target, chunks[0], 2)  # warm-up, untimed and uncounted
            outputs, cache_forwards = [], 0
            with forward_count(target) as forwards, forward_count(draft) as draft_forwards, \
                    accepted_per_step() as steps:
                t0 = time.perf_counter()
                per_call = []
                for chunk in chunks:
                    before = forwards[0]
                    out, counted = decode(target, chunk, new_tokens)
                    per_call.append(forwards[0] - before)
                    outputs.append(out)
                    cache_forwards = None if counted is None else cache_forwards + counted
                wall = time.perf_counter() - t0
            if reference is None:
                reference = outputs  # model.generate comes first
            generated = sum(out.shape[0] * (out.shape[1] - chunk.shape[1]) for out, chunk in zip(outputs, chunks))
            row = {"method": name, "batch": batch, "prompts": ids.shape[0], "prompt_length": ids.shape[1],
                   "generated_tokens": generated, "forward_passes": forwards[0], "forward_passes_per_call": per_call,
                   "forwards_per_token": forwards[0] / generated,
                   "identical_to_greedy": all(torch.equal(a, b) for a, b in zip(outputs, reference)),
                   "wall_s": round(wall, 3), "ms_per_token": 1e3 * wall / generated}
            if name != "model.generate":
                row.update(num_speculative_tokens=NUM_SPECULATIVE_TOKENS, verify_steps=len(steps),
                           accepted_draft_tokens=sum(steps),
                           mean_accepted=sum(steps) / len(steps) if steps else 0.0,
                           accepted_histogram=histogram(steps))
            if cache_forwards is not None:
                row["cache_forward_passes"] = cache_forwards  # TreeCache.stats(): the same count, its own way
            if "draft" in name or "assisted" in name:
                row["draft_forward_passes"] = draft_forwards[0]
            rows.append(row)
    return rows


def summary_lines(rows: list[dict], training: dict) -> list[dict]:
    """The suite summary's lines (see summary.py): per speculative row, forward passes per generated token
    against plain greedy and HF's prompt lookup at batch 1, the mean accepted length and the wall time."""
    plain = {r["batch"]: r for r in rows if r["method"] == "model.generate"}
    lookup = next((r for r in rows if r["method"] == "hf_prompt_lookup"), None)
    lines = [{"case": "model", "measure": "what was decoded",
              "value": f"tiny copy-task Llama trained in the benchmark ({training['steps']} steps, "
                       f"final loss {training['final_loss']})",
              "vs": f"greedy, {rows[0]['prompts']} held-out prompts of restated steps, {rows[0]['prompt_length']} "
                    f"tokens each + {rows[0]['generated_tokens'] // rows[0]['prompts']} new; "
                    "acceptance histogram: speculative_acceptance.png"}]
    for r in rows:
        if r["method"] == "model.generate":
            continue
        base = plain[r["batch"]]
        vs = [f"{base['forwards_per_token'] / r['forwards_per_token']:.2f}× fewer forwards than model.generate "
              f"(batch {r['batch']})"]
        if lookup is not None and r is not lookup:
            ratio = lookup["forwards_per_token"] / r["forwards_per_token"]
            vs.append(f"{ratio:.2f}× fewer than HF prompt lookup (batch 1)" if ratio >= 1
                      else f"{1 / ratio:.2f}× MORE than HF prompt lookup (batch 1)")
            if r["batch"] == 1:
                pairs = list(zip(r["forward_passes_per_call"], lookup["forward_passes_per_call"]))
                vs[-1] += (f", fewer on {sum(a < b for a, b in pairs)} of {len(pairs)} prompts, "
                           f"more on {sum(a > b for a, b in pairs)}")
        vs.append(f"{r['mean_accepted']:.2f} draft tokens accepted per verify step")
        vs.append(f"{r['ms_per_token']:.1f} ms/token CPU wall (model.generate {base['ms_per_token']:.1f})")
        vs.append("token-identical to greedy" if r["identical_to_greedy"] else "OUTPUT DIFFERS FROM GREEDY")
        lines.append({"case": f"{r['method']}, batch {r['batch']}", "measure": "target forwards per generated token",
                      "value": f"{r['forwards_per_token']:.3f} ({r['forward_passes']} for {r['generated_tokens']})",
                      "vs": "; ".join(vs)})
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default=None, help="results folder; the trained weights are cached in "
                                                    "<out>/spec_model/")
    parser.add_argument("--train-steps", type=int, default=600, help="training steps of the copy-task model")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = Path(args.out) / "spec_model" if args.out else None
    threads = torch.get_num_threads()
    # One thread: a tiny model gains nothing from more, and on a shared CPU a second thread that waits for
    # its share of a core slows training down many times over.
    torch.set_num_threads(1)
    try:
        return _main(args, folder)
    finally:
        torch.set_num_threads(threads)


def _main(args, folder: Path | None) -> int:
    target, draft, training = load_or_train(folder, args.train_steps, args.seed)
    print(f"model: {'cached' if training['cached'] else 'trained'} ({training['steps']} steps, "
          f"{training['train_s']} s, final loss {training['final_loss']})", flush=True)
    rows = run(target, draft, prompts(args.prompts, args.seed), args.new_tokens)
    common.print_table(rows, ["method", "batch", "generated_tokens", "forward_passes", "forwards_per_token",
                              "mean_accepted", "wall_s", "identical_to_greedy"])
    if args.out:
        path = common.write_results(args.out, "speculative", {
            "env": common.environment(), "model": training, "rows": rows, "summary": summary_lines(rows, training)})
        plot(rows, Path(path).with_name("speculative_acceptance.png"))
    wrong = [f"{r['method']} (batch {r['batch']})" for r in rows if not r["identical_to_greedy"]]
    if wrong:
        print(f"output differs from greedy model.generate: {', '.join(wrong)}")
    return 1 if wrong else 0


def plot(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars: the share of verify steps that accepted 0..k draft tokens, per speculative method at batch
    1 (a batch's rows verify the same trees as one at a time: their histograms are the same)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    spec = [r for r in rows if "accepted_histogram" in r and r["batch"] == 1]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(spec), 1)
    for i, r in enumerate(spec):
        counts = r["accepted_histogram"]
        share = [c / max(sum(counts), 1) for c in counts]
        ax.bar([x + (i - (len(spec) - 1) / 2) * width for x in range(len(counts))], share, width,
               label=f"{r['method']} (mean {r['mean_accepted']:.2f})")
    ax.set_xlabel(f"draft tokens accepted per verify step (of at most {NUM_SPECULATIVE_TOKENS})")
    ax.set_ylabel("share of verify steps")
    ax.set_title("Acceptance length per verify step, greedy, batch 1, tiny copy-task model trained in the bench",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
