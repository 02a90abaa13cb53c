"""``treeattn.hf.PrefixCache``: prompts and continuations stay cached across ``treeattn.hf.generate`` calls
and ``TreeSearch`` sessions, so a prompt that continues an earlier sequence (a shared few-shot or system
prompt, the next turn of a conversation) computes only its new tokens.

A :class:`PrefixCache` owns one page pool (a :class:`treeattn.TreeKVCache`) and a token radix index over it
(:class:`treeattn.prefix_cache.PrefixKVCache`). A call matches each prompt token by token (inside pages
too) against what earlier calls left, under its isolation key; the last prompt token is always computed
(its logits are needed). The matched prefix is read straight from the pool (the prompt's own attention
reads it as past keys and values); only the rest is prefilled. After the call its prompts and returned
continuations are cached. When the pool runs dry, cached sequences no running call uses are evicted, least
recently used first.
"""

from __future__ import annotations

import torch

from .._validate import is_fp8
from ..pages import OutOfPages
from ..prefix_cache import PrefixKVCache
from ..prefix_index import canonical_key
from .adapter import UnsupportedModel, attached, inspect_model, unwrap_compiled
from .cache import TreeCache

__all__ = ["PrefixCache"]


class PrefixCache:
    """A prefix cache for one model: ``num_pages`` pages of ``page_size`` tokens (dtype and device: the
    model's by default). Pass it to :func:`treeattn.hf.generate` (``prefix_cache=``) and
    :class:`treeattn.hf.TreeSearch` (``prefix_cache=``).

    ``stats()``: ``prompt_tokens`` (prompt tokens looked up), ``hit_tokens`` (served from the cache),
    ``prefill_tokens`` (computed), ``cached_tokens``, ``evicted_tokens``, ``evictable_pages``, ``locked_pages``,
    ``pages_used``, ``num_pages``, ... ; ``clear()`` drops every cached sequence no running call uses.
    """

    def __init__(self, model, num_pages: int = 4096, page_size: int = 16, *, device=None, dtype=None):
        if isinstance(dtype, torch.dtype) and is_fp8(dtype):
            # A hit's prefix would be read back quantized by the prompt's own attention, where a prompt computed
            # whole attends its unquantized KV: outputs would depend on what was cached.
            raise UnsupportedModel(f"dtype: expected a 16- or 32-bit float dtype (treeattn.hf.PrefixCache has no FP8 "
                                   f"pools), got {dtype}")
        model = unwrap_compiled(model)
        self.spec = inspect_model(model)
        pool = TreeCache(model, page_size=page_size, num_pages=num_pages, device=device, dtype=dtype,
                         sized_by="treeattn.hf.PrefixCache(...)")
        self.prefixes = PrefixKVCache(pool.tree)

    @property
    def page_size(self) -> int:
        return self.prefixes.cache.page_size

    @property
    def num_pages(self) -> int:
        return self.prefixes.cache.num_pages

    def stats(self) -> dict:
        return self.prefixes.stats()

    def clear(self) -> None:
        """Evict every cached sequence no running call uses and reset the counters."""
        self.prefixes.clear()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"PrefixCache(cached_tokens={s['cached_tokens']}, pages_used={s['pages_used']}/{s['num_pages']}, "
                f"page_size={self.page_size})")

    # ---- serving ----

    def tree_cache(self, model, what: str) -> TreeCache:
        """A :class:`TreeCache` over this prefix cache's pool for one call of ``model``."""
        model = unwrap_compiled(model)
        if inspect_model(model) != self.spec:
            raise ValueError(f"model: expected the model this PrefixCache was made for ({self.spec.model_type}, "
                             f"{self.spec.num_layers} layers), got another KV layout")
        return TreeCache(model, sized_by=what, prefixes=self.prefixes)

    def generate(self, model, input_ids, expand: int, cache_key, config, generate_kwargs: dict):
        """``model.generate`` over cached prefixes (what :func:`treeattn.hf.generate` runs with a prefix
        cache): ``expand`` batch rows per prompt (samples or beams). When it raises, the prefix cache is as it
        was (its counters, what it caches), but for sequences evicted to make room."""
        canonical_key(cache_key, "cache_key")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise UnsupportedModel("input_ids: expected a [batch, length] tensor of token ids with prefix_cache "
                                   f"(the cache matches token ids), got {type(input_ids).__name__}")
        with self.prefixes.transaction():  # (a failing call leaves the prefix cache as it was)
            return self._generate(model, input_ids, expand, cache_key, config, generate_kwargs)

    def _generate(self, model, input_ids, expand: int, cache_key, config, generate_kwargs: dict):
        prompts, pads = _real_prompts(input_ids, generate_kwargs.get("attention_mask"))
        cache = self.tree_cache(model, "treeattn.hf.PrefixCache(...)")
        prefixes, tree = self.prefixes, cache.tree
        locks, made = [], []
        beams = (config.num_beams or 1) > 1
        try:
            distinct = {}
            for p in prompts:
                distinct.setdefault(tuple(p), None)
            hits = {}
            for p in distinct:
                hit = prefixes.match(cache_key, list(p))
                locks.append(hit.lock)
                if hit.leaf is not None:
                    made.append(hit.leaf)
                hits[p] = hit
            # Every row continues from the same number of positions (padding included): the longest prefix all
            # rows have cached, in the padded layout.
            past = min(pad + hits[tuple(p)].length for p, pad in zip(prompts, pads))
            leaves = {}
            for p, pad in zip(prompts, pads):
                p = tuple(p)
                if p in leaves:
                    continue
                hit, keep = hits[p], max(past - pad, 0)
                leaf = hit.leaf
                if keep < hit.length:
                    prefixes.index.unhit(hit.length - keep)
                    leaf = prefixes.reserve(lambda: tree.fork_at(hit.leaf, keep)) if keep else None
                    if leaf is not None:
                        made.append(leaf)
                leaves[p] = leaf
                prefixes.count_prefill(len(p) - keep)
            for leaf in made:  # (the leaves handed to the cache release themselves)
                if leaf not in leaves.values():
                    tree.release(leaf)
            made = [leaf for leaf in leaves.values() if leaf is not None]
            if past > 0:
                cache.continue_from([leaves[tuple(p)] for p in prompts for _ in range(expand)], past)

            def record_prompts(nodes, row_of):
                for u, node in enumerate(nodes):
                    prompt = prompts[row_of.index(u) // expand]
                    locks.append(prefixes.insert(cache_key, prompt, node, lock=True)[1])

            cache.on_prompt = record_prompts
            with attached(model, cache):
                out = model.generate(input_ids, cache=cache, **generate_kwargs)
            made = []  # (the prompt step took the leaves)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            width = input_ids.shape[1]
            if not beams:
                for r, leaf in enumerate(cache.rows):
                    tokens = prompts[r // expand] + sequences[r, width:].tolist()
                    prefixes.insert(cache_key, tokens[: tree.length(leaf)], leaf)
            cache.release()
        finally:
            live = set(tree.tree.live_ids())
            for leaf in made:
                if leaf in live:
                    tree.release(leaf)
            if cache.step.mode == "idle" and cache.rows:
                cache.release()
            for lock in locks:
                prefixes.unlock(lock)
        if beams:
            per_prompt = sequences.shape[0] // len(prompts)
            # Whole rows, padding after an end-of-sequence included: what a next turn appends to.
            returned = [prompts[r // per_prompt] + sequences[r, width:].tolist() for r in range(sequences.shape[0])]
            self._record(model, returned, cache_key, config.pad_token_id)
        return out

    def _record(self, model, sequences: list[list[int]], cache_key, pad_token_id) -> None:
        """Cache ``sequences`` (beam search's returned ones: HF keeps finished beams apart from the cache's
        rows, so their KV is gone by the end) by computing what of them is not cached yet, in one batched
        forward over the missing tokens. Counted as ``record_tokens``, not as prompt lookups or prefill.
        Best effort: when the pool cannot hold them, they are not cached (the call's output is unaffected)."""
        from transformers import GenerationConfig

        width = max(len(s) for s in sequences)
        pad = 0 if pad_token_id is None else int(pad_token_id)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(sequences):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        config = GenerationConfig(max_new_tokens=1, do_sample=False, num_beams=1, pad_token_id=pad)
        device = next(unwrap_compiled(model).parameters()).device
        with self.prefixes.recording():
            try:
                self.generate(model, ids.to(device), 1, cache_key, config,
                              dict(attention_mask=mask.to(device), generation_config=config))
            except OutOfPages:
                pass


def _real_prompts(input_ids: torch.Tensor, mask) -> tuple[list[list[int]], list[int]]:
    """Each row's real tokens and its left padding (a prefix cache matches real tokens; padding must lead)."""
    ids = input_ids.detach().cpu()
    if mask is None:
        return [row.tolist() for row in ids], [0] * ids.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected a [batch, length] tensor like input_ids, got "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.detach().cpu().bool()
    prompts, pads = [], []
    for r in range(ids.shape[0]):
        pad = int((~mask[r]).sum())
        if mask[r, pad:].sum() != ids.shape[1] - pad:
            raise UnsupportedModel("attention_mask: expected left padding with prefix_cache (padding first, then "
                                   "the prompt), got padding inside a row")
        prompts.append(ids[r, pad:].tolist())
        pads.append(pad)
    return prompts, pads
