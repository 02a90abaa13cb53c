"""``treeattn.hf.generate``: ``model.generate`` with its KV in a :class:`~treeattn.hf.TreeCache`."""

from __future__ import annotations

import copy

import torch

from .adapter import UnsupportedModel, attached, unwrap_compiled
from .cache import TreeCache
from .continuation import continue_cache, record
from .prefix import PrefixCache
from .speculative import speculation_from, speculative_decoding
from .static import StaticTreeCache, compile_requested, compiled_decoding

# generate() options that need a cache treeattn does not provide, or attention outputs it does not compute.
_UNSUPPORTED_OPTIONS = {
    "assistant_model": "assisted (speculative) decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "prefill_chunk_size": "chunked prefill",
    "output_attentions": "attention weights (treeattn's decode does not compute them)",
}


def _generation_config(model, generate_kwargs: dict):
    config = copy.deepcopy(generate_kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in generate_kwargs.items() if k != "generation_config"})
    return config


def default_num_pages(num_rows: int, max_length: int, page_size: int) -> int:
    """What one cache per row holds, in pages: ``num_rows`` sequences of ``max_length - 1`` tokens (the last
    token is never fed back), each rounded up to whole pages. ``model.generate``'s default cache holds the
    same tokens (padding included), so the pool never needs more memory than it, but for that rounding.

    It suffices because a tree never holds more than its live rows' paths: pages only a released row read go
    back to the pool, and a row's path (shared or not) is at most ``ceil((max_length - 1) / page_size)`` pages,
    a page copied on write included."""
    return num_rows * -(-max(max_length - 1, 1) // page_size)


def _prompt_shape(config, input_ids, generate_kwargs: dict) -> tuple[int, int]:
    """``(batch, length)`` of the prompt ``model.generate`` will run: ``input_ids``, else ``inputs_embeds``,
    else (as transformers starts a decoder-only model) one ``bos_token_id`` per row of the first tensor
    argument, one row without any."""
    lead = input_ids if input_ids is not None else generate_kwargs.get("inputs_embeds")
    if lead is None:
        if config.bos_token_id is None:
            raise ValueError("input_ids: expected a [batch, length] tensor of prompt token ids, or a bos_token_id "
                             "to start from, got neither")
        batch = next((v.shape[0] for v in generate_kwargs.values() if isinstance(v, torch.Tensor)), 1)
        return batch, 1
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    dims = 2 if input_ids is not None else 3
    if not isinstance(lead, torch.Tensor) or lead.dim() != dims or lead.shape[0] == 0:
        got = f"shape {list(lead.shape)}" if isinstance(lead, torch.Tensor) else type(lead).__name__
        raise ValueError(f"{name}: expected a {'[batch, length]' if dims == 2 else '[batch, length, hidden]'} "
                         f"tensor with batch >= 1, got {got}")
    return lead.shape[0], lead.shape[1]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, *, page_size: int = 16, num_pages: int | None = None,
             prefix_cache=None, cache_key=None, speculative=None, num_speculative_tokens: int | None = None,
             **generate_kwargs):
    """``model.generate(input_ids, **generate_kwargs)`` with shared-prefix KV: same arguments, same result.

    HF's own generation loop makes every decision (sampling, logits processors, beam scores, stopping); the KV
    lives in a :class:`~treeattn.hf.TreeCache` where each distinct prompt is prefilled once and stored once
    however many samples or beams HF expands it into, and every decode step reads the KV rows share once.

    Args:
        model: a HF causal LM (decoder-only; GQA/MHA families whose attention goes through transformers'
            ``AttentionInterface``, and DeepSeek-V3).
        input_ids: ``[batch, prompt_length]`` (left-padded with ``attention_mask`` for prompts of different
            lengths), as for ``model.generate``; None starts from ``bos_token_id`` as ``model.generate`` does.
            ``model`` may be ``torch.compile(model)``: the model under the wrapper runs, as in its ``generate``.
        page_size: tokens per KV page.
        num_pages: size of the page pool (default: as much as one cache per sequence would hold, each
            sequence rounded up to whole pages; see :func:`default_num_pages`).
        prefix_cache: a :class:`~treeattn.hf.PrefixCache`: each prompt continues its longest cached prefix
            (only the rest is computed), and the prompts and continuations stay cached for later calls
            (``page_size``/``num_pages`` are the prefix cache's then).
        cache_key: isolation key of ``prefix_cache`` (None, str, bytes, int, bool or tuples of them): cached
            prefixes are shared only between calls with equal keys (tenant, adapter, model revision).
        speculative: ``"ngram"`` (draft trees from each sequence's own history) or a smaller HF model with the
            same vocabulary: speculative decoding, each step's draft tree verified in one forward (see
            :mod:`treeattn.hf.speculative`); greedy output is still ``model.generate``'s, sampling still follows
            the target's distribution. HF's ``assistant_model=`` and ``prompt_lookup_num_tokens=`` ask for the
            same. Not with beam search.
        num_speculative_tokens: draft tokens per sequence and step (default 8).
        past_key_values: the ``cache`` of an earlier call's output (``return_dict_in_generate=True``), to continue
            its rows as ``model.generate(..., past_key_values=...)`` does: ``input_ids`` are the earlier
            sequences with new tokens after them (or ``inputs_embeds`` likewise), and only the new tokens are
            computed. The earlier cache stays as it was (it can be continued again); the output's ``cache`` is
            a new one (sharing the earlier pool when it has room, else copying the rows into a larger one).
            An empty :class:`~treeattn.hf.TreeCache` is used as the call's cache. See
            :mod:`treeattn.hf.continuation`.
        **generate_kwargs: anything ``model.generate`` takes (``max_new_tokens``, ``do_sample``, ``temperature``,
            ``top_k``, ``top_p``, ``num_return_sequences``, ``num_beams``, ``eos_token_id``, ``pad_token_id``,
            ``attention_mask``, ``generation_config``, ``return_dict_in_generate``, ...).
            ``cache_implementation="static"`` or ``compile_config=`` ask for compiled decoding: the KV lives in a
            :class:`~treeattn.hf.static.StaticTreeCache` whose decode step transformers compiles once (where it
            compiles: a GPU, or ``compile_config._compile_all_devices``), see :mod:`treeattn.hf.static`.

    Returns:
        What ``model.generate`` returns. With ``return_dict_in_generate=True`` its ``cache`` is the
        :class:`~treeattn.hf.TreeCache` (``stats()``: ``tokens_stored`` vs ``tokens_if_unshared``;
        ``forward_passes``, ``draft_tokens``, ``accepted_draft_tokens``).

    Raises:
        UnsupportedModel: a model family or option treeattn cannot serve (the message names it).
        treeattn.OutOfPages: the pool is too small (the message says which ``num_pages`` to pass).
    """
    past, past_name = generate_kwargs.pop("past_key_values", None), "past_key_values"
    if generate_kwargs.get("cache") is not None:
        if past is not None:
            raise ValueError("cache: expected None with past_key_values (two names for one cache), got "
                             f"{type(generate_kwargs['cache']).__name__}")
        past, past_name = generate_kwargs["cache"], "cache"
    generate_kwargs.pop("cache", None)
    model = unwrap_compiled(model)
    if input_ids is None:
        input_ids = generate_kwargs.pop("inputs", None)
    speculation = speculation_from(model, speculative, num_speculative_tokens, generate_kwargs)
    config = _generation_config(model, generate_kwargs)
    if speculation is not None:
        speculation.check(config)
        generate_kwargs["custom_generate"] = speculative_decoding(speculation, cache_key)
    compiled = compile_requested(config, speculation is not None or prefix_cache is not None or past is not None)
    generate_kwargs["cache_implementation"] = None  # (treeattn brings its own cache; "static" is a StaticTreeCache)
    for name, what in _UNSUPPORTED_OPTIONS.items():
        value = generate_kwargs.get(name, getattr(config, name, None))
        if value not in (None, False):
            raise UnsupportedModel(f"{name}: {what} is not supported by treeattn.hf.generate")
    if config.use_cache is False:
        raise UnsupportedModel("use_cache: expected True (treeattn.hf.generate decodes from its cache), got False")
    num_prompts, prompt_length = _prompt_shape(config, input_ids, generate_kwargs)
    num_rows = num_prompts * max(config.num_beams or 1, config.num_return_sequences or 1)
    if past is not None:
        if prefix_cache is not None:
            raise ValueError("past_key_values: expected None with prefix_cache (the prefix cache holds the earlier "
                             "call's sequences: pass them and the new tokens as input_ids), got "
                             f"{type(past).__name__}")
        if speculation is not None:
            raise UnsupportedModel("past_key_values: continuing an earlier call with speculative decoding is not "
                                   "supported yet")
        if num_pages is not None:
            raise ValueError("num_pages: expected None with past_key_values (the continuation sizes its pool from "
                             f"the earlier cache's), got {num_pages}")
    if prefix_cache is not None:
        if not isinstance(prefix_cache, PrefixCache):
            raise ValueError(f"prefix_cache: expected a treeattn.hf.PrefixCache, got {type(prefix_cache).__name__}")
        return prefix_cache.generate(model, input_ids, num_rows // num_prompts, cache_key, config, generate_kwargs)
    max_length = prompt_length + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    if num_pages is None:
        num_pages = default_num_pages(num_rows, max(max_length, prompt_length + 1), page_size)
        if speculation is not None:
            num_pages += speculation.extra_pages(num_rows)
    continued = None
    if past is None:
        cache_args = dict(page_size=page_size, num_pages=num_pages, sized_by="treeattn.hf.generate")
        if compiled:
            cache = StaticTreeCache(model, max_length=max(max_length, prompt_length + 1), **cache_args)
        else:
            cache = TreeCache(model, **cache_args)
    else:
        continued = continue_cache(model, past, input_ids, num_prompts, num_rows, prompt_length, max_length,
                                   past_name)
        cache = continued.cache
        if continued.leaves:
            cache.continue_from(continued.expand(num_rows // num_prompts), past.positions)
    try:
        with (compiled_decoding if compiled else attached)(model, cache):
            out = model.generate(input_ids, cache=cache, **generate_kwargs)
    except BaseException:
        if continued is not None:  # (the earlier cache stays as it was; a given empty one is emptied again)
            continued.release_unused()
            if cache.step.mode == "idle":
                cache.release()
        raise
    if not config.return_dict_in_generate:
        cache.release()
    elif speculation is None:
        record(cache, model, out.sequences, from_ids="inputs_embeds" not in generate_kwargs,
               refused="beam search" if (config.num_beams or 1) > 1 else "compiled decoding" if compiled else None)
    return out
