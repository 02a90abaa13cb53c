"""Speculative decoding in treeattn.hf.generate against model.generate (default cache): the same greedy
sequences with n-gram and draft-model trees (a left-padded batch, EOS, max_new_tokens edges, HF's own
assistant_model= and prompt_lookup_num_tokens=), the target's sampling distribution, the stats, every page
back in the pool afterwards, clear errors. Tiny random-init Llama, Qwen2 and DeepSeek-V3 (fp32, CPU)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_speculative_verify import chi_square_p_value

import treeattn
import treeattn.hf
from treeattn.hf.testing import FAMILIES, tiny_model
from treeattn.testing import assert_close

PAD = 0
PAGE = 4
VOCAB = 32


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family, seed=11, vocab=VOCAB)


@pytest.fixture(scope="module")
def self_draft(model):
    """A copy of the target as its draft model: its top-1 is the target's, so whole paths are accepted."""
    return copy.deepcopy(model)


@pytest.fixture(scope="module")
def other_draft(family):
    """An unrelated draft model of the target's vocabulary (one layer): most drafts are rejected."""
    return tiny_model(family, seed=5, vocab=VOCAB, layers=1)


def _repetitive_prompts(lengths=(11, 7)):
    """A left-padded batch of prompts that repeat themselves (so n-gram lookups find continuations)."""
    g = torch.Generator().manual_seed(3)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        motif = torch.randint(1, VOCAB, (4,), generator=g)
        ids[row, width - n:] = motif.repeat(n // 4 + 1)[:n]
        mask[row, width - n:] = 1
    return ids, mask


def _speculative(model, ids, **kwargs):
    """treeattn.hf.generate with speculation; checks that every page is back once the cache is released."""
    out = treeattn.hf.generate(model, ids, page_size=PAGE, pad_token_id=PAD, return_dict_in_generate=True, **kwargs)
    stats = out.cache.stats()
    assert stats["accepted_draft_tokens"] <= stats["draft_tokens"]
    out.cache.release()
    assert out.cache.stats()["pages_used"] == 0
    return out.sequences, stats


def _drafter(name, self_draft, other_draft):
    return {"ngram": "ngram", "self": self_draft, "other": other_draft}[name]


@pytest.mark.parametrize("drafter", ["ngram", "self", "other"])
def test_greedy_batch_equals_model_generate(model, self_draft, other_draft, drafter):
    ids, mask = _repetitive_prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    out, stats = _speculative(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              speculative=_drafter(drafter, self_draft, other_draft), num_speculative_tokens=5)
    assert torch.equal(out, ref)
    assert stats["draft_tokens"] > 0
    if drafter == "self":  # the draft is the target: paths are accepted, fewer forwards than tokens
        assert stats["accepted_draft_tokens"] > 0
        assert stats["forward_passes"] < 12


def test_one_row_emits_accepted_plus_one_per_forward(model, self_draft):
    """Batch of one without EOS: the prefill emits one token and each verifying forward its accepted draft
    tokens plus the target's own, so new tokens == forward_passes + accepted_draft_tokens."""
    ids, _ = _repetitive_prompts(lengths=(9,))
    for drafter, new in (("ngram", 10), (self_draft, 17)):
        ref = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        out, stats = _speculative(model, ids, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                  speculative=drafter, num_speculative_tokens=4)
        assert torch.equal(out, ref)
        assert stats["forward_passes"] + stats["accepted_draft_tokens"] == new
    assert 2 * stats["forward_passes"] <= new  # the draft is the target: two tokens or more a forward


def test_every_draft_node_sees_its_own_path(model, other_draft, monkeypatch):
    """The verifying forward's logits for every node — rejected siblings too, and siblings whose pages were
    copied on write before their parents' KV was written — are the model's own after that node's prefix."""
    import treeattn.hf.speculative as speculative

    oracle = copy.deepcopy(model)  # (the model itself runs through treeattn inside generate)
    ids, mask = _repetitive_prompts()
    pads = (mask == 0).sum(1).tolist()
    seen = []
    processed = speculative._processed

    def recording(logits_processor, batch_size, requests, logits, device):
        seen.extend((ids_[pads[b]:], row) for (b, ids_), row in zip(requests, logits))
        return processed(logits_processor, batch_size, requests, logits, device)

    monkeypatch.setattr(speculative, "_processed", recording)
    _speculative(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, speculative=other_draft,
                 num_speculative_tokens=6)
    assert len(seen) > 2 * 6
    with torch.no_grad():
        for prefix, row in seen:
            assert_close(row, oracle(torch.tensor([prefix])).logits[0, -1].float(), torch.float32, what="logits")


@pytest.mark.parametrize("new", [1, 2, 3])
def test_max_new_tokens_edges(model, self_draft, new):
    ids, mask = _repetitive_prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    out, stats = _speculative(model, ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              speculative=self_draft, num_speculative_tokens=8)
    assert torch.equal(out, ref)
    assert stats["forward_passes"] <= new


def test_eos_pads_like_model_generate(model, self_draft):
    """An EOS that one row reaches mid-path ends it there (padded after), the other row goes on."""
    ids, mask = _repetitive_prompts()
    probe = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    eos = int(probe[0, ids.shape[1] + 4])
    for drafter in ("ngram", self_draft):
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                             eos_token_id=eos)
        out, _ = _speculative(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                              speculative=drafter, num_speculative_tokens=6)
        assert torch.equal(out, ref)


def test_hf_assisted_and_prompt_lookup_arguments(model, self_draft):
    """Code written for model.generate's assisted and prompt-lookup decoding runs unchanged (and batched)."""
    ids, mask = _repetitive_prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    for kwargs in (dict(assistant_model=self_draft), dict(prompt_lookup_num_tokens=3)):
        out, stats = _speculative(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kwargs)
        assert torch.equal(out, ref)
        assert stats["draft_tokens"] > 0


def test_num_return_sequences_and_logits_processors(model, self_draft):
    """Sampling with top_k=1 is greedy: every returned sequence of every prompt is the greedy one, through
    transformers' own warpers on every verified node."""
    ids, mask = _repetitive_prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=PAD)
    out, _ = _speculative(model, ids, attention_mask=mask, max_new_tokens=7, do_sample=True, top_k=1,
                          num_return_sequences=3, speculative=self_draft, num_speculative_tokens=4)
    assert torch.equal(out, ref.repeat_interleave(3, dim=0))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=PAD,
                         repetition_penalty=1.5)
    out, _ = _speculative(model, ids, attention_mask=mask, max_new_tokens=7, do_sample=False, repetition_penalty=1.5,
                          speculative="ngram", num_speculative_tokens=4)
    assert torch.equal(out, ref)


def test_sampling_follows_the_targets_distribution():
    """Chi-square over the joint of the 2nd and 3rd new tokens (vocabulary of 4): rows sampled speculatively
    (an unrelated draft model proposing 2-deep top-2 trees, accepted and rejected by recursive rejection)
    against the target's exact probabilities from plain forwards. The attention runs on treeattn's fp32
    reference backend: what is tested is the verification, and the Triton interpreter would take minutes
    over this many rows (the kernels' agreement with the reference is tested elsewhere)."""
    vocab, rows = 4, 600
    target = tiny_model("llama", seed=2, vocab=vocab, hidden=32, layers=1, initializer_range=0.5)
    draft = tiny_model("llama", seed=9, vocab=vocab, hidden=32, layers=1, initializer_range=0.5)
    prompt = torch.tensor([[1, 3, 2]])
    torch.manual_seed(0)
    with treeattn._dispatch.force("reference"):
        out, stats = _speculative(target, prompt, max_new_tokens=3, do_sample=True, top_k=None, eos_token_id=None,
                                  num_return_sequences=rows, speculative=draft, num_speculative_tokens=3)
    assert 0 < stats["accepted_draft_tokens"] < stats["draft_tokens"]
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for a, b in out[:, -2:].tolist():
        counts[a, b] += 1
    # Exact P(t2, t3) = sum over t1 of p(t1) p(t2 | t1) p(t3 | t1, t2), from one plain forward of every triple.
    triples = torch.tensor(list(itertools.product(range(vocab), repeat=3)))
    with torch.no_grad():
        logits = target(torch.cat([prompt.expand(len(triples), -1), triples], dim=1)).logits.double()
    probs = torch.softmax(logits, dim=-1)
    n = prompt.shape[1]
    p = probs[:, n - 1].gather(1, triples[:, :1]) * probs[:, n].gather(1, triples[:, 1:2]) \
        * probs[:, n + 1].gather(1, triples[:, 2:3])
    expected = p.view(vocab, vocab * vocab).sum(0).view(vocab, vocab) * rows
    assert chi_square_p_value(counts.flatten(), expected.flatten()) > 1e-3


def test_clear_errors(model, self_draft):
    ids, _ = _repetitive_prompts(lengths=(6,))
    with pytest.raises(treeattn.hf.UnsupportedModel, match="num_beams: expected 1"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, num_beams=2, speculative="ngram")
    with pytest.raises(ValueError, match="speculative: expected 'ngram' or a draft model"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens: expected an int >= 1"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="num_speculative_tokens: expected None without speculative"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, num_speculative_tokens=4)
    with pytest.raises(ValueError, match="expected one of speculative, assistant_model"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, speculative="ngram", prompt_lookup_num_tokens=3)
    with pytest.raises(treeattn.hf.UnsupportedModel, match="assistant_model: expected a draft model other than"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, assistant_model=model)
    with pytest.raises(ValueError, match="expected a draft model with the target's vocabulary"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, speculative=tiny_model("llama", vocab=VOCAB + 1))
    with pytest.raises(treeattn.hf.UnsupportedModel, match="output_scores"):
        treeattn.hf.generate(model, ids, max_new_tokens=3, speculative="ngram", output_scores=True,
                             return_dict_in_generate=True)
    assert "forward" not in vars(model)
