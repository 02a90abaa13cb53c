"""End to end: ``treeattn.hf.generate`` against ``model.generate`` (default cache, SDPA) for best-of-64 sampling
and beam-8 search on a small random-init Llama.

For each row: KV bytes the TreeCache holds at the end (pages in use) and at its peak, against the bytes of the
cache ``model.generate`` returns (one row per sequence, padding included); tokens stored against one cache per
sequence; whether the sequences are identical. On a GPU also tokens per second of both (new tokens of every
sequence / wall time, after a warm-up run). On CPU nothing is timed (the Triton kernels run in the interpreter).

``host_step``: the host time treeattn.hf adds to one decode step (attention entries, KV writes, the step's append
and plan) on a 32-layer, 64-row Llama with a tiny hidden size and every Triton launch stubbed, next to
``model.generate``'s own step on the same model (target ≤ 0.4 ms added).

    python bench/bench_hf.py --out bench/results/local/latest
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AttentionInterface

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import cache_bytes, tiny_model  # noqa: E402

PAGE_SIZE = 16
ROWS = {
    "best_of_64": dict(do_sample=True, num_return_sequences=64),
    "beam_8": dict(num_beams=8, num_return_sequences=8),
}


def small_model():
    """The benchmarks' small random-init Llama (4 layers, hidden 256, 8 query / 4 KV heads of 32, vocab 1024):
    bf16 on a GPU, fp32 on CPU."""
    on_gpu = torch.cuda.is_available()
    return tiny_model("llama", layers=4, hidden=256, heads=8, vocab=1024,
                      dtype=torch.bfloat16 if on_gpu else torch.float32, device="cuda" if on_gpu else "cpu")


def model_info(model, page_size: int) -> dict:
    config = model.config
    return {"family": config.model_type, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "vocab": config.vocab_size, "dtype": str(next(model.parameters()).dtype), "page_size": page_size}


def peak_pages(model):
    """Tracks the pages in use of the TreeCache the model runs with, at every forward (after the step's
    append): returns (``[peak]``, the hook's handle)."""
    peaks = [0]

    def hook(module, args, kwargs):
        cache = kwargs.get("cache")
        if isinstance(cache, treeattn.hf.TreeCache):
            peaks[0] = max(peaks[0], cache.stats()["pages_used"])

    return peaks, model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def timed(fn, on_gpu: bool):
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if on_gpu:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_row(model, name: str, prompt_length: int, new_tokens: int, seed: int = 0) -> dict:
    on_gpu = torch.cuda.is_available()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_length), generator=generator).to(device)
    kwargs = dict(ROWS[name], max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                  return_dict_in_generate=True)
    if on_gpu:  # warm-up (Triton compiles, cuBLAS picks kernels)
        treeattn.hf.generate(model, prompt, page_size=PAGE_SIZE, **kwargs)
        model.generate(prompt, **kwargs)
    peaks, handle = peak_pages(model)
    try:
        torch.manual_seed(seed)
        out, tree_s = timed(lambda: treeattn.hf.generate(model, prompt, page_size=PAGE_SIZE, **kwargs), on_gpu)
    finally:
        handle.remove()
    torch.manual_seed(seed)
    ref, ref_s = timed(lambda: model.generate(prompt, **kwargs), on_gpu)
    stats = out.cache.stats()
    default_bytes = cache_bytes(ref.cache)
    sequences = out.sequences.shape[0]
    row = {
        "row": name,
        "prompt": prompt_length,
        "new_tokens": new_tokens,
        "sequences": sequences,
        "identical_sequences": bool(torch.equal(out.sequences, ref.sequences)),
        "tokens_stored": stats["tokens_stored"],
        "tokens_if_unshared": stats["tokens_if_unshared"],
        "tree_kv_bytes": stats["bytes_used"],
        "tree_kv_peak_bytes": peaks[0] * stats["bytes_per_page"],
        "tree_pool_bytes": stats["num_pages"] * stats["bytes_per_page"],
        "default_cache_kv_bytes": default_bytes,
        "kv_saved": 1.0 - stats["bytes_used"] / default_bytes,
        "kv_saved_at_peak": 1.0 - peaks[0] * stats["bytes_per_page"] / default_bytes,
    }
    if on_gpu:
        row["tree_tokens_per_s"] = sequences * new_tokens / tree_s
        row["default_tokens_per_s"] = sequences * new_tokens / ref_s
        row["speedup"] = ref_s / tree_s
    out.cache.release()
    return row


# ---- host time per decode step (kernels stubbed) --------------------------------------------------------

HOST_STEP_TARGET_MS = 0.4


class _Clock:
    """Wall time of every call of the functions it wraps (the per-layer entries of treeattn.hf), by entry."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def wrap(self, name: str, fn):
        calls = self.calls.setdefault(name, [])

        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - start)
        return timed_call

    def per_step_ms(self, steps: int) -> dict[str, float]:
        """Each entry's median call times its calls per step: a shared machine's preemptions, which a sum would
        count, do not move a median."""
        return {name: statistics.median(t) * len(t) / steps * 1e3 for name, t in self.calls.items() if t}


@contextlib.contextmanager
def _clocked_entries(clock: _Clock):
    """Every per-layer call treeattn.hf adds to a decode step (the attention entry, the cache's KV write) and
    the step's opening (append and plan) run under ``clock``."""
    from treeattn.hf import adapter
    from treeattn.hf.cache import TreeCache

    saved_write, saved_decode = TreeCache.write, TreeCache.decode
    AttentionInterface.register(adapter.IMPLEMENTATION, clock.wrap("attention", adapter.treeattn_attention))
    timed_write = clock.wrap("kv_write", saved_write)
    TreeCache.write = lambda self, *args: (timed_write if self.step.mode == "decode" else saved_write)(self, *args)

    @contextlib.contextmanager
    def decode(self, *args, **kwargs):
        steps = saved_decode(self, *args, **kwargs)
        clock.wrap("step_open", steps.__enter__)()
        try:
            yield self.step
        finally:
            steps.__exit__(None, None, None)

    TreeCache.decode = decode
    try:
        yield
    finally:
        TreeCache.write, TreeCache.decode = saved_write, saved_decode
        AttentionInterface.register(adapter.IMPLEMENTATION, adapter.treeattn_attention)


def host_step_row(layers: int = 32, rows: int = 64, prompt: int = 32, steps: int = 8, repeats: int = 5) -> dict:
    """Host ms per decode step on a ``layers``-layer Llama with a tiny hidden size (its own math is cheap),
    ``rows`` greedy rows of one prompt, every Triton launch stubbed: what treeattn.hf adds (the attention entries,
    the KV writes and the step's append and plan, summed by a clock around them) next to ``model.generate``'s
    whole step (``steps + 2`` minus 2 new tokens, over ``steps``; median of ``repeats``)."""
    from bench_host import stubbed_triton_launches

    model = tiny_model("llama", layers=layers, hidden=64, heads=4, vocab=128)
    ids = torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(0)).repeat(rows, 1)

    def generate(new_tokens: int, tree: bool) -> None:
        kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                      eos_token_id=None)
        if tree:
            out = treeattn.hf.generate(model, ids, page_size=PAGE_SIZE, return_dict_in_generate=True, **kwargs)
            out.cache.release()
        else:
            model.generate(ids, **kwargs)

    def per_step_ms(tree: bool) -> float:
        walls = {}
        for n in (2, steps + 2):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                generate(n, tree)
                times.append(time.perf_counter() - start)
            walls[n] = statistics.median(times)
        return (walls[steps + 2] - walls[2]) / steps * 1e3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (host time: the tiny model's math gains nothing from threads on a shared machine)
    try:
        with stubbed_triton_launches(), torch.no_grad():
            generate(2, True)
            clock = _Clock()
            with _clocked_entries(clock):
                for _ in range(repeats):
                    generate(steps + 1, True)  # the prompt, then `steps` decode steps
            added = clock.per_step_ms(steps * repeats)
            tree_ms, model_ms = per_step_ms(True), per_step_ms(False)
    finally:
        torch.set_num_threads(threads)
    return {"layers": layers, "rows": rows, "prompt": prompt,
            "treeattn_added_ms": sum(added.values()), **{f"{name}_ms": ms for name, ms in added.items()},
            "tree_step_ms": tree_ms, "model_generate_step_ms": model_ms, "target_ms": HOST_STEP_TARGET_MS,
            "load_average": os.getloadavg()[0]}  # (a shared machine's load moves host times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=common.cli_description(__doc__))
    parser.add_argument("--out", default="bench/results/local/latest")
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--prompt", type=int, default=1024 if on_gpu else 256)
    parser.add_argument("--new-tokens", type=int, default=256 if on_gpu else 8)
    parser.add_argument("--host-step-only", action="store_true",
                        help="only the host_step row (the KV-bytes rows run the model in Triton's CPU interpreter)")
    args = parser.parse_args(argv)
    model = small_model()
    rows = [] if args.host_step_only else [run_row(model, name, args.prompt, args.new_tokens) for name in ROWS]
    columns = ["row", "prompt", "new_tokens", "sequences", "identical_sequences", "tokens_stored", "tokens_if_unshared",
               "tree_kv_bytes", "tree_kv_peak_bytes", "default_cache_kv_bytes", "kv_saved", "kv_saved_at_peak"]
    if on_gpu:
        columns += ["tree_tokens_per_s", "default_tokens_per_s", "speedup"]
    if rows:
        common.print_table(rows, columns)
    host = host_step_row()
    common.print_table([host], list(host))
    payload = {"env": common.environment(), "model": model_info(model, PAGE_SIZE), "rows": rows,
               "host_step": host, "summary": summary_lines(rows) + host_step_lines(host)}
    print(f"wrote {common.write_results(args.out, 'hf', payload)}")


def summary_lines(rows: list[dict]) -> list[dict]:
    """The suite summary's lines for this benchmark (see summary.py)."""
    lines = []
    for r in rows:
        case = f"{r['row']} (prompt {r['prompt']}, {r['new_tokens']} new tokens)"
        same = "identical sequences" if r["identical_sequences"] else "SEQUENCES DIFFER"
        lines.append({"case": case, "measure": "KV bytes at the end (peak)",
                      "value": f"{r['tree_kv_bytes'] / 1e6:.2f} MB ({r['tree_kv_peak_bytes'] / 1e6:.2f} MB)",
                      "vs": f"{r['default_cache_kv_bytes'] / r['tree_kv_bytes']:.1f}x fewer than "
                            f"model.generate's cache ({r['default_cache_kv_bytes'] / 1e6:.2f} MB); {same}"})
        if "speedup" in r:
            lines.append({"case": case, "measure": "tokens/s (GPU)", "value": f"{r['tree_tokens_per_s']:.0f}",
                          "vs": f"{r['speedup']:.2f}x model.generate ({r['default_tokens_per_s']:.0f} tokens/s)"})
    return lines


def host_step_lines(row: dict) -> list[dict]:
    """The suite summary's line for the host-step row."""
    added, target = row["treeattn_added_ms"], row["target_ms"]
    verdict = f"meets target ≤ {target} ms" if added <= target else f"{added / target:.1f}× the target ({target} ms)"
    return [{"case": f"treeattn.hf decode step, {row['layers']} layers, {row['rows']} rows",
             "measure": "host ms per step added by treeattn.hf (kernels stubbed)",
             "value": f"{added:.2f} ms (attention {row.get('attention_ms', 0):.2f}, KV writes "
                      f"{row.get('kv_write_ms', 0):.2f}, append and plan {row.get('step_open_ms', 0):.2f})",
             "vs": f"{verdict}; model.generate's whole step "
                   f"{row['model_generate_step_ms']:.1f} ms, treeattn.hf.generate's {row['tree_step_ms']:.1f} ms"
                   + (f" (load average {row['load_average']:.1f})" if "load_average" in row else "")}]


if __name__ == "__main__":
    main()
