"""Compiled decoding through treeattn.hf.generate (``compile_config=``, ``cache_implementation="static"``): the
decode step compiles once (fullgraph, no dynamic shapes, no recompile as the tree grows or across generate
calls) and gives model.generate's sequences and scores; transformers' own static-cache and compiled-forward
generation tests, run through treeattn.hf.generate; the fixed plan capacity fits every tree it is sized for."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import treeattn
import treeattn.hf
from treeattn.hf.static import StaticTreeCache, compiled_decoding, decode_capacity
from treeattn.hf.testing import FAMILIES, tiny_model
from treeattn.testing import assert_close

PAD = 0
PAGE = 4  # 6-token prompts and 8 new tokens cross pages


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles (each compile or recompile is one) and hands
    them to ``backend``. transformers deep-copies compile options, so the count lives outside the instance."""

    def __init__(self, backend: str = "aot_eager"):
        self.backend, self.graphs = backend, []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, gm, example_inputs, **_):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def _compile_config(backend: CountingBackend, **kwargs) -> transformers.CompileConfig:
    # What transformers' compiled-forward test asks for: no graph break, no dynamic shape; on every device.
    config = transformers.CompileConfig(backend=backend, fullgraph=True, dynamic=False, **kwargs)
    config._compile_all_devices = True
    return config


def _two_input_sets(generator, batch=2, length=6, vocab=128):
    """Two different prompt batches of one shape, the second left-padded (transformers' test runs two
    sequential generations, so that a cache stuck after the first compiled run shows)."""
    first = torch.randint(1, vocab, (batch, length), generator=generator)
    second = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    second[0, :2], mask[0, :2] = PAD, 0
    return [dict(input_ids=first), dict(input_ids=second, attention_mask=mask)]


@pytest.mark.interpreter
@pytest.mark.parametrize("family, how", list(zip(FAMILIES, ["compile_config", "cache_implementation"] * 2)))
def test_generate_compile_model_forward(family, how):
    """transformers' test_generate_compile_model_forward(_fullgraph): the compiled step gives the eager
    sequences and scores, with one compile for both generations (no recompile as the tree grows)."""
    model = tiny_model(family, seed=5)
    backend = CountingBackend()
    kwargs = dict(do_sample=False, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
                  pad_token_id=PAD, compile_config=_compile_config(backend))
    if how == "cache_implementation":
        kwargs["cache_implementation"] = "static"
    for inputs in _two_input_sets(torch.Generator().manual_seed(0)):
        ref = model.generate(**inputs, **{k: v for k, v in kwargs.items() if k != "compile_config"})
        out = treeattn.hf.generate(model, **inputs, page_size=PAGE, **kwargs)
        assert torch.equal(out.sequences, ref.sequences)
        assert_close(torch.stack(out.scores), torch.stack(ref.scores), torch.float32, what="scores")
        assert isinstance(out.cache, StaticTreeCache) and out.cache.is_compileable
        assert out.cache.stats()["forward_passes"] == 6
        out.cache.release()
    assert len(backend.graphs) == 1


@pytest.mark.interpreter
def test_generate_with_static_cache():
    """transformers' test_generate_with_static_cache: ``cache_implementation="static"`` gives a compileable
    cache with a layer per model layer, sized for prompt + new tokens, and the dynamic cache's results (on CPU
    without a compile_config transformers does not compile: the same cache runs eagerly)."""
    model = tiny_model("qwen2", seed=1)
    ids = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, pad_token_id=PAD)
    out = treeattn.hf.generate(model, ids, page_size=PAGE, cache_implementation="static", **kwargs)
    ref = model.generate(ids, **kwargs)
    cache = out.cache
    assert isinstance(cache, StaticTreeCache) and cache.is_compileable
    assert len(cache.layers) == model.config.num_hidden_layers
    assert cache.max_length == ids.shape[1] + 8
    assert torch.equal(out.sequences, ref.sequences)
    assert_close(torch.stack(out.scores), torch.stack(ref.scores), torch.float32, what="scores")


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", [
    dict(do_sample=True, num_return_sequences=3, top_k=20, temperature=1.2),  # compiled: rows share the prompt
    dict(num_beams=2, do_sample=False),  # transformers compiles no beam step: the same cache, eagerly
])
def test_compiled_sampling_and_beams_match_model_generate(mode):
    model = tiny_model("llama", seed=2, layers=1)
    backend = CountingBackend()
    inputs = _two_input_sets(torch.Generator().manual_seed(2))[1]  # left-padded
    torch.manual_seed(7)
    ref = model.generate(**inputs, max_new_tokens=5, pad_token_id=PAD, **mode)
    torch.manual_seed(7)
    out = treeattn.hf.generate(model, **inputs, page_size=PAGE, max_new_tokens=5, pad_token_id=PAD,
                               compile_config=_compile_config(backend), return_dict_in_generate=True, **mode)
    assert torch.equal(out.sequences, ref)
    assert len(backend.graphs) == (0 if mode.get("num_beams") else 1)
    stats = out.cache.stats()
    assert stats["tokens_stored"] < stats["tokens_if_unshared"]  # the prompt is still stored once


@pytest.mark.interpreter
def test_decode_step_compiles_once_with_inductor():
    """The real compiler: inductor's graph of the decode step runs treeattn's registered ops (kv_write,
    tree_decode) as opaque calls, compiles once over ten steps of a growing tree and two generate calls, and
    gives model.generate's greedy sequences."""
    model = tiny_model("llama", seed=3, layers=1)
    backend = CountingBackend("inductor")
    for inputs in _two_input_sets(torch.Generator().manual_seed(3)):
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        out = treeattn.hf.generate(model, **inputs, page_size=PAGE, max_new_tokens=10, do_sample=False,
                                   pad_token_id=PAD, compile_config=_compile_config(backend))
        assert torch.equal(out, ref)
    assert len(backend.graphs) == 1
    ops = {str(node.target) for node in backend.graphs[0].graph.nodes if node.op == "call_function"}
    assert any("treeattn.kv_write_run" in op for op in ops) and any("treeattn.tree_decode_run" in op for op in ops)


@pytest.mark.gpu
def test_cuda_graphs_replay_the_decode_step():
    """On a GPU, transformers' default compile mode (inductor, ``reduce-overhead``) replays the step as a CUDA
    graph: fixed buffers refilled in place between replays give model.generate's sequences."""
    model = tiny_model("llama", seed=4, device="cuda", dtype=torch.float16)
    for inputs in _two_input_sets(torch.Generator().manual_seed(4), batch=4):
        inputs = {k: v.cuda() for k, v in inputs.items()}
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
        out = treeattn.hf.generate(model, **inputs, page_size=PAGE, max_new_tokens=12, do_sample=False,
                                   pad_token_id=PAD, cache_implementation="static")
        assert torch.equal(out, ref)


def test_model_left_as_found_and_refusals():
    model = tiny_model("llama", seed=6)
    ids = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(6))
    before = set(model.__dict__)
    treeattn.hf.generate(model, ids, max_new_tokens=2, cache_implementation="static")
    assert set(model.__dict__) == before and model.config._attn_implementation != "treeattn"
    with pytest.raises(treeattn.hf.UnsupportedModel, match="cache_implementation: expected None or 'static'"):
        treeattn.hf.generate(model, ids, max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(treeattn.hf.UnsupportedModel, match="compile_config: compiled decoding together"):
        treeattn.hf.generate(model, ids, max_new_tokens=2, cache_implementation="static", speculative="ngram")
    with pytest.raises(ValueError, match="max_length: expected an int >= 1"):
        StaticTreeCache(model, max_length=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), page_size=st.sampled_from([1, 4, 16]), num_rows=st.integers(1, 12))
def test_decode_capacity_fits_every_tree(seed, page_size, num_rows):
    """Leaves forked and grown at random (copies on write mid-page included), each step's plan refilled into
    the plan :func:`decode_capacity` sized: every tree of ``num_rows`` leaves of at most ``max_length`` tokens
    fits, so the compiled step never needs a larger plan."""
    rng = random.Random(seed)
    max_length = rng.randint(1, 300)
    cache = treeattn.TreeKVCache(1, 1, 8, page_size=page_size, num_pages=2 * num_rows * (max_length + page_size))
    rows = [cache.add(rng.randint(1, max_length))]
    plan = None

    def grow():
        for r in rows:
            room = max_length - cache.length(r)
            if room > 0 and rng.random() < 0.7:
                cache.append([r], rng.randint(1, room))

    while len(rows) < num_rows:
        parent = rows.pop(rng.randrange(len(rows)))
        kids = cache.fork(parent, min(rng.randint(2, 4), num_rows - len(rows)))
        cache.release(parent)  # (its children keep its path)
        rows += kids
        grow()
    plan = cache.plan(rows, capacity=decode_capacity(num_rows, max_length, page_size))
    for _ in range(3):
        grow()
        plan = cache.plan(rows, into=plan)
    assert plan.num_queries == num_rows


@pytest.mark.interpreter
def test_a_step_that_outgrows_the_plan_replans():
    """A cache sized for shorter sequences than it decodes re-plans into a larger plan (the compiled step would
    recompile once) and still gives model.generate's tokens."""
    model = tiny_model("llama", seed=8, layers=1)
    ids = torch.randint(1, 128, (2, 3), generator=torch.Generator().manual_seed(8))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    cache = StaticTreeCache(model, max_length=4, page_size=1, num_pages=64)
    with compiled_decoding(model, cache):
        out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out, ref)
    assert cache.max_length == 16  # 4 -> 8 -> 16: two larger plans for 15 tokens
    assert cache.plan.capacity == decode_capacity(2, 16, 1)
