"""The draft model of speculative decoding runs on its own treeattn cache: one draft forward per tree depth
(one token per node, never the context again), the trees it drafts equal those of plain draft-model forwards
over the whole context, output equal to model.generate, every page of its pool back at the end. Tiny
random-init Llama, Qwen2 and DeepSeek-V3 (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hf_speculative import PAD, PAGE, VOCAB, _repetitive_prompts

import treeattn.hf
import treeattn.hf.draft as draft_module
from treeattn.hf.testing import FAMILIES, tiny_model
from treeattn.speculative import draft_model_tree
from treeattn.testing import assert_close

BUDGET = 5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter", ["self", "other"])
def test_draft_model_decodes_through_its_own_cache(family, drafter, monkeypatch):
    model = tiny_model(family, seed=11, vocab=VOCAB)
    # A copy of the target accepts whole paths (its deepest accepted token was never fed: a 2-token catch-up);
    # an unrelated one-layer model gets most nodes rejected (released, the next step feeds the bonus token).
    draft = copy.deepcopy(model) if drafter == "self" else tiny_model(family, seed=5, vocab=VOCAB, layers=1)
    oracle = copy.deepcopy(draft)  # (the draft itself runs through treeattn inside generate)

    pools, steps, forwards = [], [], []

    class RecordingCache(treeattn.hf.TreeCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    trees = draft_module.DraftModelDrafter.trees

    def recording_trees(self, rows):
        before = len(forwards)
        out = trees(self, rows)
        steps.append(([(list(real), depth) for _, real, depth in rows], out, len(forwards) - before))
        return out

    monkeypatch.setattr(draft_module, "TreeCache", RecordingCache)
    monkeypatch.setattr(draft_module.DraftModelDrafter, "trees", recording_trees)
    draft.register_forward_hook(lambda module, args, kwargs, out: forwards.append(kwargs["input_ids"].shape),
                                with_kwargs=True)

    ids, mask = _repetitive_prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=11, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None)
    out = treeattn.hf.generate(model, ids, attention_mask=mask, max_new_tokens=11, do_sample=False,
                               pad_token_id=PAD, eos_token_id=None, page_size=PAGE, return_dict_in_generate=True,
                               speculative=draft, num_speculative_tokens=BUDGET)
    assert torch.equal(out.sequences, ref)
    stats = out.cache.stats()
    out.cache.release()
    assert out.cache.stats()["pages_used"] == 0

    (pool,) = pools
    assert pool.stats()["pages_used"] == 0 and pool.stats()["leaves"] == 0
    assert "forward" not in vars(draft)
    # The prompt once, then per step as many forwards as the deepest tree (one more when a depth the tree did
    # not keep was fed), one token per node each.
    assert forwards[0] == ids.shape
    assert all(shape[1] == 1 and shape[0] <= len(ids) * (BUDGET + 2) for shape in forwards[1:])
    for _, made, count in steps:
        assert 0 <= count - max(t.max_depth for t in made) <= 1
    assert stats["draft_forward_passes"] == len(forwards) == pool.stats()["forward_passes"]
    if drafter == "self":
        assert stats["accepted_draft_tokens"] > 0 and stats["forward_passes"] <= 11 // 2
    else:
        assert stats["accepted_draft_tokens"] < stats["draft_tokens"]

    # Each tree is the one plain forwards of the draft model over the whole context draft.
    with torch.no_grad():
        for rows, made, _ in steps:
            for (real, depth), tree in zip(rows, made):
                expected = draft_model_tree(
                    lambda paths, real=real: oracle(torch.tensor([real + p for p in paths])).logits[:, -1].float(),
                    BUDGET, top_k=2, max_depth=max(depth, 0))
                assert tree.tokens.tolist() == expected.tokens.tolist()
                assert tree.parents.tolist() == expected.parents.tolist()
                assert_close(tree.token_probs, expected.token_probs, torch.float32, what="draft probabilities")
