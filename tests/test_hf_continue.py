"""HF's continuation idiom through treeattn.hf.generate: ``generate(..., past_key_values=out.cache)`` with the
TreeCache of an earlier call continues its rows, computing only the new tokens, and gives what
``model.generate`` gives for the same continuation (HF's own ``past_key_values=`` continuation, and a fresh
run over the whole sequence), on tiny random Llama, Qwen2 and DeepSeek-V3 models (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import treeattn
import treeattn.hf
from treeattn.hf.testing import FAMILIES, tiny_model

PAD = 0
# As transformers' own continuation tests: no early stop (the continuation would go on past an EOS).
# PAD is never generated: HF would read it as padding in the next call's inferred mask (see
# test_padding_inside_the_continued_positions).
KW = {"pad_token_id": PAD, "eos_token_id": -1, "do_sample": False, "return_dict_in_generate": True,
      "output_scores": True, "suppress_tokens": [PAD]}


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=11)


def _tokens(seed, rows, n):
    return torch.randint(1, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _same_outputs(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _rows(cache):
    """What a TreeCache holds: its rows, their lengths, its positions (its pool may be shared)."""
    return cache.rows, [cache.tree.length(r) for r in cache.rows], cache.positions


def _padded(seed):
    """Two left-padded prompts: ``input_ids``, ``attention_mask``."""
    ids = _tokens(seed, 2, 7)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    return ids, mask


def test_continue_from_past_key_values(model):
    """transformers' test_generate_continue_from_past_key_values: 4 tokens in one call equal 3, then 1 more
    from the returned cache (scores of both calls together), and HF's own continuation."""
    ids, mask = _padded(1)
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=4, **KW)
    first = treeattn.hf.generate(model, ids, attention_mask=mask, max_new_tokens=3, num_pages=16, **KW)
    before, rows = first.cache.stats(), _rows(first.cache)
    grown = torch.nn.functional.pad(mask, (0, first.sequences.shape[1] - mask.shape[1]), value=1)
    then = treeattn.hf.generate(model, first.sequences, attention_mask=grown, past_key_values=first.cache,
                                max_new_tokens=1, **KW)
    hf_first = model.generate(ids, attention_mask=mask, max_new_tokens=3, **KW)
    hf_then = model.generate(hf_first.sequences, attention_mask=grown, past_key_values=hf_first.past_key_values,
                             max_new_tokens=1, **KW)
    _same_outputs(hf_then, then)
    then.scores = first.scores + then.scores
    _same_outputs(whole, then)
    assert then.cache.stats()["forward_passes"] == 1  # only the one token not cached yet was computed
    assert then.cache.tree is first.cache.tree  # (the earlier pool has room: its pages are shared, not copied)
    assert _rows(first.cache) == rows  # the earlier cache as it was
    assert then.cache.stats()["tokens_stored"] == before["tokens_stored"] + 2  # (one pool: a new token per row)


def test_continue_from_inputs_embeds(model):
    """transformers' test_generate_continue_from_inputs_embeds: a prompt given as embeddings, continued by the
    embeddings of what was generated, equals one call."""
    embeds = model.get_input_embeddings()(_tokens(2, 2, 6))
    whole = model.generate(inputs_embeds=embeds, max_new_tokens=4, **KW)
    first = treeattn.hf.generate(model, inputs_embeds=embeds, max_new_tokens=3, **KW)
    more = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], dim=1)
    then = treeattn.hf.generate(model, inputs_embeds=more, past_key_values=first.cache, max_new_tokens=1, **KW)
    assert torch.equal(whole.sequences, torch.cat([first.sequences, then.sequences], dim=1))
    torch.testing.assert_close(whole.scores[-1], then.scores[0], rtol=1e-4, atol=1e-4)
    assert then.cache.stats()["forward_passes"] == 1


def test_multi_turn_conversation_grows_the_pool(model):
    """Turns of new tokens after each answer: every turn equals model.generate over the whole conversation;
    when the earlier pool has no room the rows move to a larger one (still sharing what they shared)."""
    ids = _tokens(3, 1, 5)
    out = treeattn.hf.generate(model, ids, max_new_tokens=3, **KW)
    pools = [out.cache.tree]
    for turn in range(3):
        ids = torch.cat([out.sequences, _tokens(10 + turn, 1, 4)], dim=1)
        out = treeattn.hf.generate(model, ids, past_key_values=out.cache, max_new_tokens=6, **KW)
        _same_outputs(model.generate(ids, max_new_tokens=6, **KW), out)
        assert out.cache.stats()["tokens_stored"] == ids.shape[1] + 5  # (the last token is never fed back)
        pools.append(out.cache.tree)
    assert len({id(p) for p in pools}) > 1  # (the first call's pool had no room: its rows were copied)


def test_branches_from_one_cache_and_samples(model):
    """One cache continued twice (different new tokens), and continued into sampled rows
    (num_return_sequences) and beams: each as model.generate over the whole sequences, the earlier cache
    unchanged."""
    first = treeattn.hf.generate(model, _tokens(4, 1, 6), max_new_tokens=2, **KW)
    before = _rows(first.cache)
    for seed in (5, 6):
        ids = torch.cat([first.sequences, _tokens(seed, 1, 3)], dim=1)
        _same_outputs(model.generate(ids, max_new_tokens=3, **KW),
                      treeattn.hf.generate(model, ids, past_key_values=first.cache, max_new_tokens=3, **KW))
    assert _rows(first.cache) == before
    ids = torch.cat([first.sequences, _tokens(7, 1, 2)], dim=1)
    kw = {**KW, "do_sample": True, "top_k": 20, "num_return_sequences": 3, "max_new_tokens": 4}
    torch.manual_seed(0)
    ref = model.generate(ids, **kw)
    torch.manual_seed(0)
    out = treeattn.hf.generate(model, ids, past_key_values=first.cache, **kw)
    _same_outputs(ref, out)
    kw = {**KW, "num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 3}
    _same_outputs(model.generate(ids, **kw), treeattn.hf.generate(model, ids, past_key_values=first.cache, **kw))
    # The sampled rows continue too (as HF's own: the cache's rows are the returned sequences).
    more = torch.cat([out.sequences, _tokens(8, 3, 2)], dim=1)
    _same_outputs(model.generate(more, max_new_tokens=2, **KW),
                  treeattn.hf.generate(model, more, past_key_values=out.cache, max_new_tokens=2, **KW))


class FailsAfter(LogitsProcessor):
    """Raises on its call number ``after + 1`` (0: in the prompt step)."""

    def __init__(self, after):
        self.calls, self.after = 0, after

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("processor failed")
        return scores


def test_a_failing_continuation_changes_nothing(model):
    first = treeattn.hf.generate(model, _tokens(9, 2, 5), max_new_tokens=2, **KW)
    before, pool = first.cache.stats(), first.cache.tree.stats()["pages_used"]
    ids = torch.cat([first.sequences, _tokens(10, 2, 3)], dim=1)
    for after in (0, 2):  # in the prompt step, mid-decode
        with pytest.raises(RuntimeError, match="processor failed"):
            treeattn.hf.generate(model, ids, past_key_values=first.cache, max_new_tokens=4,
                                 logits_processor=LogitsProcessorList([FailsAfter(after)]), **KW)
        assert first.cache.stats() == before and first.cache.tree.stats()["pages_used"] == pool
    _same_outputs(model.generate(ids, max_new_tokens=3, **KW),
                  treeattn.hf.generate(model, ids, past_key_values=first.cache, max_new_tokens=3, **KW))


def test_padding_inside_the_continued_positions(model):
    """The cache holds every generated token: a mask that pads one of them (HF infers one from a generated
    pad_token_id) cannot be served, and says so."""
    ids = _tokens(14, 1, 5)
    first = treeattn.hf.generate(model, ids, max_new_tokens=3, **KW)
    more = torch.cat([first.sequences, _tokens(15, 1, 2)], dim=1)
    mask = torch.ones_like(more)
    mask[0, 6] = 0
    with pytest.raises(treeattn.hf.UnsupportedModel, match="attention_mask: expected the 7 cached positions of row "
                                                           "0 as padding first"):
        treeattn.hf.generate(model, more, attention_mask=mask, past_key_values=first.cache, max_new_tokens=1, **KW)
    _same_outputs(model.generate(more, max_new_tokens=2, **KW),
                  treeattn.hf.generate(model, more, past_key_values=first.cache, max_new_tokens=2, **KW))


def test_an_empty_tree_cache_is_used_as_given(model):
    given = treeattn.hf.TreeCache(model, page_size=4, num_pages=16)
    ids = _tokens(11, 1, 6)
    out = treeattn.hf.generate(model, ids, past_key_values=given, max_new_tokens=3, **KW)
    assert out.cache is given and given.page_size == 4
    _same_outputs(model.generate(ids, max_new_tokens=3, **KW), out)


def test_caches_that_cannot_be_continued(model):
    ids = _tokens(12, 2, 5)
    out = treeattn.hf.generate(model, ids, max_new_tokens=2, **KW)
    more = torch.cat([out.sequences, _tokens(13, 2, 1)], dim=1)

    def go(past, input_ids=more, **kw):
        return treeattn.hf.generate(model, input_ids, past_key_values=past, max_new_tokens=1, **{**KW, **kw})

    with pytest.raises(ValueError, match="past_key_values: expected None or the TreeCache of an earlier .* got "
                                         "DynamicCache"):
        go(DynamicCache())
    with pytest.raises(ValueError, match=r"past_key_values: expected a TreeCache with 1 rows \(the batch\), got 2"):
        go(out.cache, more[:1])
    with pytest.raises(ValueError, match="input_ids: expected more than the 6 positions"):
        go(out.cache, out.sequences[:, :-1])
    wrong = more.clone()
    wrong[1, 2] += 1
    with pytest.raises(ValueError, match="input_ids: expected rows that start with the earlier call's sequences "
                                         r"\(whose KV past_key_values holds\), got row 1 differing"):
        go(out.cache, wrong)
    with pytest.raises(ValueError, match="past_key_values: expected None with prefix_cache"):
        go(out.cache, prefix_cache=treeattn.hf.PrefixCache(model, num_pages=8, page_size=4))
    with pytest.raises(ValueError, match="num_pages: expected None with past_key_values"):
        go(out.cache, num_pages=64)
    with pytest.raises(ValueError, match="cache: expected None with past_key_values"):
        go(out.cache, cache=out.cache)
    with pytest.raises(ValueError, match="cache: expected None or the TreeCache of an earlier"):
        treeattn.hf.generate(model, more, cache=DynamicCache(), max_new_tokens=1, **KW)
    other = tiny_model(model.config.model_type, seed=12)
    with pytest.raises(ValueError, match="past_key_values: expected a TreeCache made by this model"):
        treeattn.hf.generate(other, more, past_key_values=out.cache, max_new_tokens=1, **KW)
    other = tiny_model("llama" if model.config.model_type != "llama" else "qwen2", seed=12, layers=3)
    with pytest.raises(ValueError, match="past_key_values: expected a TreeCache made for this model's KV layout"):
        treeattn.hf.generate(other, more, past_key_values=out.cache, max_new_tokens=1, **KW)
    beams = treeattn.hf.generate(model, ids, max_new_tokens=2, num_beams=2, **KW)
    with pytest.raises(ValueError, match="past_key_values: expected the TreeCache of a call without beam search"):
        go(beams.cache, torch.cat([beams.sequences, more[:, -1:]], dim=1))
    pc = treeattn.hf.PrefixCache(model, num_pages=16, page_size=4)
    cached = treeattn.hf.generate(model, ids, prefix_cache=pc, max_new_tokens=2, **KW)
    with pytest.raises(ValueError, match="past_key_values: expected a TreeCache of a call without prefix_cache"):
        go(cached.cache)
    lone = treeattn.hf.TreeCache(model, num_pages=8)
    lone.set_rows([lone.tree.add(3), lone.tree.add(3)])
    with pytest.raises(ValueError, match="past_key_values: expected the TreeCache a treeattn.hf.generate call "
                                         "returned"):
        go(lone)
    # Nothing above changed the earlier cache: it still continues.
    _same_outputs(model.generate(more, max_new_tokens=1, **KW), go(out.cache))
