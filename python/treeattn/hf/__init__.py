"""treeattn behind HF transformers: ``generate`` over shared prefixes, and step-level tree search.

    import treeattn.hf
    out = treeattn.hf.generate(model, input_ids, do_sample=True, num_return_sequences=64, max_new_tokens=256)

``generate`` takes what ``model.generate`` takes and returns what it returns; HF's own loop makes every
decision (sampling, logits processors, beam scores, stopping) while the KV lives in a :class:`TreeCache`:
each distinct prompt is prefilled and stored once, samples and beams that share a prefix share its pages,
and every decode step reads shared KV once (``treeattn.tree_decode``; DeepSeek-V3 through
``treeattn.mla_tree_decode`` in the absorbed form). The attention runs as the ``"treeattn"`` entry of
transformers' ``AttentionInterface``.

    search = treeattn.hf.TreeSearch(model)
    root = search.add_prompt(prompt_ids)
    children = search.expand([root], 4, max_new_tokens=64, stop=[step_delimiter_ids])[0]

:class:`TreeSearch` drives the same adapter from outside, step by step: the whole frontier of a search decoded
together, one batched step at a time, with each node's tokens and log-probabilities.

    pc = treeattn.hf.PrefixCache(model, num_pages=4096, page_size=16)
    out = treeattn.hf.generate(model, input_ids, prefix_cache=pc, max_new_tokens=64)

A :class:`PrefixCache` keeps prompts and continuations across calls: a prompt computes only what no earlier
call (under the same ``cache_key``) left cached, matched token by token.

This subpackage needs HF transformers (``pip install treeattn[hf]``); the rest of treeattn does not.
"""

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover  (the test suite has transformers)
    raise ImportError(
        "treeattn.hf needs HF transformers, an optional dependency of treeattn: pip install treeattn[hf] "
        "(or pip install transformers)"
    ) from err

from .adapter import UnsupportedModel
from .cache import CacheStep, TreeCache
from .generate import generate
from .prefix import PrefixCache
from .search import TreeSearch

__all__ = ["CacheStep", "PrefixCache", "TreeCache", "TreeSearch", "generate", "UnsupportedModel"]
