"""Speculative decoding together with a treeattn.hf.PrefixCache, against model.generate: prompts reuse their
cached prefixes, the n-gram drafter also drafts what followed the same history in sequences cached under the
same key (never another key's), rows that stop mid-path leave exactly their output cached, eviction in a
small pool, a draft model too; no node left live, every page back after clear(). Tiny random-init Llama,
Qwen2 and DeepSeek-V3 (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hf_speculative import PAD, PAGE, VOCAB, _repetitive_prompts

import treeattn.hf
from treeattn.hf.testing import FAMILIES, tiny_model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=11, vocab=VOCAB)


def _same(model, pc, ids, mask, key=None, **kw):
    """treeattn.hf.generate(prefix_cache=pc, speculative=...) gives model.generate's greedy sequences and leaves
    no node live; returns the sequences and the call's stats."""
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": PAD, "attention_mask": mask, **kw}
    ref = model.generate(ids, **{k: v for k, v in kw.items() if k not in ("speculative", "num_speculative_tokens")})
    out = treeattn.hf.generate(model, ids, prefix_cache=pc, cache_key=key, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref)
    assert pc.prefixes.cache.tree.live_ids() == []
    return out.sequences, out.cache.stats()


def _turn(sequences, new):
    """The next turn of each row: its sequence (left padding dropped) and ``new`` more tokens, left-padded."""
    rows = [torch.cat([r[r != PAD], torch.tensor(new)]) for r in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def test_cached_prefixes_and_cached_continuations(model):
    pc = treeattn.hf.PrefixCache(model, num_pages=128, page_size=PAGE)
    ids, mask = _repetitive_prompts()
    spec = dict(speculative="ngram", num_speculative_tokens=6, eos_token_id=None)
    _, first = _same(model, pc, ids, mask, key="a", **spec)
    # Another key sees nothing of "a": the same work again, prompts computed again.
    hits = pc.stats()["hit_tokens"]
    _, other = _same(model, pc, ids, mask, key="b", **spec)
    assert pc.stats()["hit_tokens"] == hits
    assert (other["forward_passes"], other["draft_tokens"]) == (first["forward_passes"], first["draft_tokens"])
    # Under "a" again: the prompts hit, and the cached continuation of the same history drafts the answer.
    out, again = _same(model, pc, ids, mask, key="a", **spec)
    assert pc.stats()["hit_tokens"] > hits
    assert again["forward_passes"] < first["forward_passes"]
    assert again["accepted_draft_tokens"] > first["accepted_draft_tokens"]
    # The next turn continues the cached sequences.
    before = pc.stats()
    _same(model, pc, *_turn(out, [3, 5, 7]), key="a", **spec)
    after = pc.stats()
    assert after["prefill_tokens"] - before["prefill_tokens"] == 2 * (3 + 1)  # the new tokens and the last output
    pc.clear()
    assert pc.stats()["pages_used"] == 0


def test_rows_that_stop_mid_path_cache_their_output(model):
    """EOS inside an accepted path: the row keeps only what it emitted, so the next turn over its output (padding
    after EOS dropped) is still model.generate's."""
    pc = treeattn.hf.PrefixCache(model, num_pages=128, page_size=PAGE)
    ids, mask = _repetitive_prompts()
    probe = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                           eos_token_id=None)  # (the model's own EOS would end the probe early, padding it)
    eos = int(probe[0, ids.shape[1] + 4])
    draft = copy.deepcopy(model)  # (accepts whole paths: EOS falls inside one)
    out, _ = _same(model, pc, ids, mask, eos_token_id=eos, speculative=draft, num_speculative_tokens=6)
    assert (out[0, ids.shape[1]:] == eos).any()
    _same(model, pc, *_turn(out, [2, 9]), eos_token_id=None, speculative="ngram", num_speculative_tokens=4)
    pc.clear()
    assert pc.stats()["pages_used"] == 0


def test_eviction_in_a_small_pool_with_a_draft_model(model):
    pc = treeattn.hf.PrefixCache(model, num_pages=18, page_size=PAGE)
    draft = tiny_model(model.config.model_type, seed=5, vocab=VOCAB, layers=1)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        ids = torch.randint(1, VOCAB, (1, 11), generator=g)
        _same(model, pc, ids, None, speculative=draft, num_speculative_tokens=4, eos_token_id=None)
        assert pc.stats()["pages_used"] <= 18
    assert pc.stats()["evicted_tokens"] > 0
    pc.clear()
    assert pc.stats()["pages_used"] == 0
