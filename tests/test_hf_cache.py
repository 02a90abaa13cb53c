"""treeattn.hf.TreeCache's step state machine: the step record the attention reads, steps opened and closed
by the cache's own methods, a failed prompt step undone, read-only state (tiny random-init Llama, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

import treeattn.hf  # noqa: E402
from treeattn.hf.testing import tiny_model  # noqa: E402


def test_steps_are_opened_and_closed_by_the_cache():
    model = tiny_model("llama", seed=3)
    search = treeattn.hf.TreeSearch(model, page_size=4, num_pages=32)
    cache, seen = search.cache, []
    handle = model.base_model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(cache.step))
    try:
        root = search.add_prompt([5, 6, 7, 8, 9])
        kids = search.expand(root, 3, max_new_tokens=2, generator=torch.Generator().manual_seed(0))[0]
    finally:
        handle.remove()
    prefill, decode = seen
    assert prefill.mode == "prefill" and len(prefill.rows) == 1 and prefill.plan is None
    assert prefill.slots.tolist() == list(range(5)) and prefill.take.tolist() == list(range(5))
    assert prefill.longest_row == 5 and prefill.prompt_attention == "sdpa"
    assert decode.mode == "decode" and len(decode.rows) == 3 and decode.slots.numel() == 3 and decode.take is None
    assert decode.plan is not None and decode.longest_row == 6
    assert cache.step.mode == "idle" and cache.step == treeattn.hf.CacheStep()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.step.mode = "decode"
    with pytest.raises(AttributeError):
        cache.rows = ()
    with pytest.raises(RuntimeError, match="written outside a step"):
        cache.write(0, torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    assert len(kids) == 3


def test_a_failed_prompt_step_is_undone():
    model = tiny_model("llama", seed=3)
    cache = treeattn.hf.TreeCache(model, page_size=4, num_pages=16)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(RuntimeError, match="model failed"):
        with cache.prefill(2, 6, mask, row_of=[0, 1, 1]) as step:
            assert cache.step is step and step.take.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
            assert cache.stats()["pages_used"] == 2 + 2
            with pytest.raises(RuntimeError, match="expected no running step, got a prefill step"):
                cache.set_rows([])
            raise RuntimeError("model failed")
    assert cache.stats()["pages_used"] == 0 and cache.expects_prompt and cache.rows == () and cache.step.mode == "idle"
    with cache.prefill(2, 6, mask, row_of=[0, 1, 1]):
        pass
    assert len(cache.rows) == 3 and cache.positions == 6 and not cache.expects_prompt
    assert [cache.tree.length(r) for r in cache.rows] == [5, 6, 6]
    with cache.decode(3) as step:
        assert step.rows == cache.rows and step.longest_row == 7
    assert cache.positions == 7
    cache.release()
    assert cache.stats()["pages_used"] == 0 and cache.expects_prompt
