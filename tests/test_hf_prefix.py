"""treeattn.hf.PrefixCache against model.generate: every output the same while prompts reuse what earlier
calls cached (token by token, inside pages), on tiny random Llama, Qwen2 and DeepSeek-V3 models (fp32, CPU):
multi-turn reuse, hits that end mid-page, left-padded batches, samples and beams, isolation keys, eviction
in a small pool; the statistics say what was computed."""

from __future__ import annotations

import pytest
import torch
from test_hf_continue import FailsAfter
from transformers import LogitsProcessorList

import treeattn
import treeattn.hf
from treeattn.hf.testing import FAMILIES, tiny_model

PAD = 0
PAGE = 4


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=11)


def _tokens(g, n):
    return torch.randint(1, 128, (n,), generator=g)


def _batch(rows):
    """A left-padded batch of 1-D token tensors: ``input_ids``, ``attention_mask``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _same(model, pc, ids, key=None, seed=0, **kw):
    """model.generate and treeattn.hf.generate(prefix_cache=pc) on the same inputs give the same sequences
    (and scores); returns the sequences."""
    kw = {"max_new_tokens": 5, "pad_token_id": PAD, **kw}
    torch.manual_seed(seed)
    ref = model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
    torch.manual_seed(seed)
    out = treeattn.hf.generate(model, ids, prefix_cache=pc, cache_key=key, return_dict_in_generate=True,
                               output_scores=True, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return out.sequences


def test_multi_turn_reuses_everything_but_the_new_part(model):
    g = torch.Generator().manual_seed(1)
    pc = treeattn.hf.PrefixCache(model, num_pages=64, page_size=PAGE)
    seq = _tokens(g, 9)[None]  # 9 tokens: the hit of the next turn ends mid-page
    for turn in range(3):
        before = pc.stats()
        seq = _same(model, pc, seq, do_sample=False)
        after = pc.stats()
        computed = after["prefill_tokens"] - before["prefill_tokens"]
        prompt = after["prompt_tokens"] - before["prompt_tokens"]
        if turn:
            assert computed == 3 + 1  # the new tokens and the last generated one (never fed back)
        assert after["hit_tokens"] - before["hit_tokens"] == prompt - computed
        seq = torch.cat([seq, _tokens(g, 3)[None]], dim=1)
    s = pc.stats()
    assert s["prompt_tokens"] == s["hit_tokens"] + s["prefill_tokens"]
    assert s["pages_used"] <= s["num_pages"] and s["cached_tokens"] > 0


def test_hits_inside_pages_and_nodes(model):
    """Prompts that share an earlier prompt's first k tokens, k not a multiple of the page size."""
    g = torch.Generator().manual_seed(2)
    pc = treeattn.hf.PrefixCache(model, num_pages=64, page_size=PAGE)
    base = _tokens(g, 13)
    _same(model, pc, base[None], do_sample=False)
    for k in (5, 7, 10, 2):
        before = pc.stats()["hit_tokens"]
        _same(model, pc, torch.cat([base[:k], _tokens(g, 3)])[None], do_sample=False)
        assert pc.stats()["hit_tokens"] - before >= k


def test_left_padded_batch_sampling_and_beams(model):
    g = torch.Generator().manual_seed(3)
    pc = treeattn.hf.PrefixCache(model, num_pages=128, page_size=PAGE)
    shared = _tokens(g, 6)
    ids, mask = _batch([torch.cat([shared, _tokens(g, 3)]), torch.cat([shared, _tokens(g, 1)])])
    _same(model, pc, ids, attention_mask=mask, do_sample=False)
    ids, mask = _batch([torch.cat([shared, _tokens(g, 2)]), torch.cat([shared[:5], _tokens(g, 4)])])
    before = pc.stats()["hit_tokens"]
    _same(model, pc, ids, attention_mask=mask, do_sample=True, num_return_sequences=3, top_k=20, seed=5)
    assert pc.stats()["hit_tokens"] > before
    _same(model, pc, ids, attention_mask=mask, num_beams=3, num_return_sequences=2, do_sample=False)


def test_beam_search_caches_its_returned_sequences(model):
    """Beam search's returned sequences are cached (HF keeps finished beams apart from the cache's rows, so
    they are recorded afterwards): the next turn on any of them computes only its new tokens."""
    g = torch.Generator().manual_seed(7)
    pc = treeattn.hf.PrefixCache(model, num_pages=96, page_size=PAGE)
    seqs = _same(model, pc, _tokens(g, 7)[None], num_beams=3, num_return_sequences=3, do_sample=False,
                 length_penalty=0.5, early_stopping=True)
    assert pc.stats()["record_tokens"] > 0
    for r in range(seqs.shape[0]):
        before = pc.stats()
        _same(model, pc, torch.cat([seqs[r], _tokens(g, 2)])[None], do_sample=False, max_new_tokens=2)
        after = pc.stats()
        # (recorded as whole sequences, their last token's KV included: only the new tokens are computed)
        assert after["prefill_tokens"] - before["prefill_tokens"] == 2
    s = pc.stats()
    assert s["prompt_tokens"] == s["hit_tokens"] + s["prefill_tokens"]


def test_beam_search_in_a_small_pool(model):
    """A pool about the size of one beam call: recording the returned beams evicts earlier sequences, the
    output is still exact and nothing stays live."""
    g = torch.Generator().manual_seed(8)
    pc = treeattn.hf.PrefixCache(model, num_pages=9, page_size=PAGE)
    for _ in range(2):
        _same(model, pc, _tokens(g, 7)[None], num_beams=3, num_return_sequences=3, do_sample=False)
        assert pc.prefixes.cache.tree.live_ids() == []
        s = pc.stats()
        assert s["pages_used"] <= 9 and s["prompt_tokens"] == s["hit_tokens"] + s["prefill_tokens"]
    assert pc.stats()["evicted_tokens"] > 0


def test_isolation_keys(model):
    g = torch.Generator().manual_seed(4)
    pc = treeattn.hf.PrefixCache(model, num_pages=64, page_size=PAGE)
    prompt = _tokens(g, 8)[None]
    _same(model, pc, prompt, key="tenant-a", do_sample=False)
    hits = pc.stats()["hit_tokens"]
    _same(model, pc, prompt, key="tenant-b", do_sample=False)
    _same(model, pc, prompt, key=None, do_sample=False)
    assert pc.stats()["hit_tokens"] == hits  # no match across keys
    _same(model, pc, prompt, key="tenant-a", do_sample=False)
    assert pc.stats()["hit_tokens"] == hits + 7
    with pytest.raises(ValueError, match="cache_key: expected"):
        treeattn.hf.generate(model, prompt, prefix_cache=pc, cache_key=1.5, max_new_tokens=2)


def test_eviction_in_a_small_pool(model):
    """A pool that holds about two conversations: older ones are evicted, outputs stay exact, and a request
    larger than what can be freed fails with the cache consistent."""
    g = torch.Generator().manual_seed(5)
    pc = treeattn.hf.PrefixCache(model, num_pages=10, page_size=PAGE)
    for _ in range(4):
        _same(model, pc, _tokens(g, 11)[None], do_sample=False)
        s = pc.stats()
        assert s["pages_used"] <= 10
    assert pc.stats()["evicted_tokens"] > 0
    with pytest.raises(treeattn.OutOfPages):
        treeattn.hf.generate(model, _tokens(g, 60)[None], prefix_cache=pc, max_new_tokens=2, pad_token_id=PAD)
    tree = pc.prefixes.cache
    assert tree.tree.live_ids() == []
    _same(model, pc, _tokens(g, 7)[None], do_sample=False)
    pc.clear()
    s = pc.stats()
    assert s["cached_tokens"] == 0 and s["pages_used"] == 0 and s["prompt_tokens"] == 0


def test_a_failing_call_leaves_the_prefix_cache_as_it_was(model):
    """A call that fails in its prompt step or mid-decode (a logits processor raising, the pool running out
    with nothing left to evict) changes neither the counters nor what is cached."""
    g = torch.Generator().manual_seed(9)
    pc = treeattn.hf.PrefixCache(model, num_pages=12, page_size=PAGE)
    first = _same(model, pc, _tokens(g, 9)[None], do_sample=False)[0]
    turn = torch.cat([first, _tokens(g, 3)])[None]
    lock = pc.prefixes.index.lock(pc.prefixes.index.match(None, first.tolist() + [0]))  # (nothing evictable)
    for fail, error, message in (
            ({"logits_processor": LogitsProcessorList([FailsAfter(0)])}, RuntimeError, "processor failed"),
            ({"logits_processor": LogitsProcessorList([FailsAfter(2)])}, RuntimeError, "processor failed"),
            ({"max_new_tokens": 40}, treeattn.OutOfPages, "pass num_pages=")):
        before, cached = pc.stats(), [n.tokens.tolist() for n in pc.prefixes.index.nodes()]
        with pytest.raises(error, match=message):
            treeattn.hf.generate(model, torch.cat([turn, _tokens(g, 2)[None]], dim=1), prefix_cache=pc,
                                 pad_token_id=PAD, **{"max_new_tokens": 5, **fail})
        assert pc.stats() == before
        assert [n.tokens.tolist() for n in pc.prefixes.index.nodes()] == cached
        assert pc.prefixes.cache.tree.live_ids() == []
    pc.prefixes.unlock(lock)
    before = pc.stats()
    _same(model, pc, turn, do_sample=False)
    assert pc.stats()["hit_tokens"] - before["hit_tokens"] == first.shape[0] - 1  # (its last token: not fed back)


def test_misuse(model):
    pc = treeattn.hf.PrefixCache(model, num_pages=8, page_size=PAGE)
    with pytest.raises(ValueError, match="prefix_cache: expected"):
        treeattn.hf.generate(model, torch.ones(1, 3, dtype=torch.long), prefix_cache=object(), max_new_tokens=1)
    out = treeattn.hf.generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=1, pad_token_id=PAD,
                               return_dict_in_generate=True)
    with pytest.raises(ValueError, match="past_key_values: expected None with prefix_cache"):
        treeattn.hf.generate(model, out.sequences, past_key_values=out.cache, prefix_cache=pc, max_new_tokens=1,
                             pad_token_id=PAD)
    out.cache.release()
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        with pytest.raises(treeattn.hf.UnsupportedModel, match="dtype: expected a 16- or 32-bit float dtype"):
            treeattn.hf.PrefixCache(model, num_pages=8, dtype=fp8)
    ids, mask = torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(treeattn.hf.UnsupportedModel, match="attention_mask: expected left padding"):
        treeattn.hf.generate(model, ids, attention_mask=mask, prefix_cache=pc, max_new_tokens=1)


def test_tree_search_reuses_and_leaves_its_nodes_cached(model):
    """add_prompt continues the longest cached prefix (a generate call's, another search's released nodes);
    every log-probability equals a plain forward of the model."""
    from treeattn.hf.testing import teacher_forced_logprobs

    g = torch.Generator().manual_seed(6)
    pc = treeattn.hf.PrefixCache(model, num_pages=64, page_size=PAGE)
    first = _same(model, pc, _tokens(g, 10)[None], do_sample=False)[0]
    search = treeattn.hf.TreeSearch(model, prefix_cache=pc)
    before = pc.stats()
    root = search.add_prompt(torch.cat([first, _tokens(g, 3)]))
    assert pc.stats()["prefill_tokens"] - before["prefill_tokens"] == 4  # 3 new + the last generated token
    kids = search.expand([root], 3, max_new_tokens=4, generator=torch.Generator().manual_seed(1))[0]
    path = search.tokens(kids[0])
    for k in kids:
        assert torch.allclose(teacher_forced_logprobs(model, search.tokens(k), 4), search.logprobs(k), atol=1e-4)
    for k in [*kids, root]:
        search.release(k)
    assert pc.prefixes.cache.tree.live_ids() == []
    again = treeattn.hf.TreeSearch(model, prefix_cache=pc)
    before = pc.stats()["prefill_tokens"]
    root = again.add_prompt(torch.cat([path, _tokens(g, 2)]))
    assert pc.stats()["prefill_tokens"] - before == 3
    kids = again.expand([root], 2, max_new_tokens=3, generator=torch.Generator().manual_seed(2))[0]
    for k in kids:
        assert torch.allclose(teacher_forced_logprobs(model, again.tokens(k), 3), again.logprobs(k), atol=1e-4)
