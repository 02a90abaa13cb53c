"""``treeattn.hf.generate``: ``model.generate`` with its KV in a :class:`~treeattn.hf.TreeCache`."""

from __future__ import annotations

import copy

import torch

from .adapter import UnsupportedModel, attached
from .cache import TreeCache

# generate() options that need a cache treeattn does not provide, or attention outputs it does not compute.
_UNSUPPORTED_OPTIONS = {
    "assistant_model": "assisted (speculative) decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "prefill_chunk_size": "chunked prefill",
    "cache_implementation": "a transformers cache implementation (treeattn brings its own cache)",
    "output_attentions": "attention weights (treeattn's decode does not compute them)",
}


def _generation_config(model, generate_kwargs: dict):
    config = copy.deepcopy(generate_kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in generate_kwargs.items() if k != "generation_config"})
    return config


def default_num_pages(num_prompts: int, prompt_length: int, num_rows: int, max_length: int, page_size: int) -> int:
    """A pool that holds what one cache per row would hold (so it never needs more memory than the default
    cache): every row's whole sequence, the prompts once more, and one copied page per row."""
    pages = -(-max_length // page_size)
    return num_rows * (pages + 1) + num_prompts * -(-prompt_length // page_size)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, *, page_size: int = 16, num_pages: int | None = None,
             **generate_kwargs):
    """``model.generate(input_ids, **generate_kwargs)`` with shared-prefix KV: same arguments, same result.

    HF's own generation loop makes every decision (sampling, logits processors, beam scores, stopping); the KV
    lives in a :class:`~treeattn.hf.TreeCache` where each distinct prompt is prefilled once and stored once
    however many samples or beams HF expands it into, and every decode step reads the KV rows share once.

    Args:
        model: a HF causal LM (decoder-only; GQA/MHA families whose attention goes through transformers'
            ``AttentionInterface``, and DeepSeek-V3).
        input_ids: ``[batch, prompt_length]`` (left-padded with ``attention_mask`` for prompts of different
            lengths), as for ``model.generate``.
        page_size: tokens per KV page.
        num_pages: size of the page pool (default: as much as one cache per sequence would hold).
        **generate_kwargs: anything ``model.generate`` takes (``max_new_tokens``, ``do_sample``, ``temperature``,
            ``top_k``, ``top_p``, ``num_return_sequences``, ``num_beams``, ``eos_token_id``, ``pad_token_id``,
            ``attention_mask``, ``generation_config``, ``return_dict_in_generate``, ...).

    Returns:
        What ``model.generate`` returns. With ``return_dict_in_generate=True`` its ``cache`` is the
        :class:`~treeattn.hf.TreeCache` (``stats()``: ``tokens_stored`` vs ``tokens_if_unshared``).

    Raises:
        UnsupportedModel: a model family or option treeattn cannot serve (the message names it).
        treeattn.OutOfPages: the pool is too small (the message says which ``num_pages`` to pass).
    """
    for name in ("cache", "past_key_values"):
        if generate_kwargs.get(name) is not None:
            raise ValueError(f"{name}: expected None (treeattn.hf.generate brings its own TreeCache), got {type(generate_kwargs[name]).__name__}")
    if input_ids is None:
        input_ids = generate_kwargs.pop("inputs", None)
    config = _generation_config(model, generate_kwargs)
    for name, what in _UNSUPPORTED_OPTIONS.items():
        value = generate_kwargs.get(name, getattr(config, name, None))
        if value not in (None, False):
            raise UnsupportedModel(f"{name}: {what} is not supported by treeattn.hf.generate")
    if config.use_cache is False:
        raise UnsupportedModel("use_cache: expected True (treeattn.hf.generate decodes from its cache), got False")
    lead = input_ids if input_ids is not None else generate_kwargs.get("inputs_embeds")
    if lead is None:
        raise ValueError("input_ids: expected a [batch, length] tensor of prompt token ids, got None")
    num_prompts, prompt_length = lead.shape[0], lead.shape[1]
    num_rows = num_prompts * max(config.num_beams or 1, config.num_return_sequences or 1)
    max_length = prompt_length + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    if num_pages is None:
        num_pages = default_num_pages(num_prompts, prompt_length, num_rows, max_length, page_size)
    cache = TreeCache(model, page_size=page_size, num_pages=num_pages)
    cache.hint_where = "treeattn.hf.generate"
    with attached(model, cache):
        out = model.generate(input_ids, cache=cache, **generate_kwargs)
    if not config.return_dict_in_generate:
        cache.release()
    return out
