"""treeattn.hf.generate against model.generate (default cache): the same sequences for greedy decoding,
sampling and beam search, on tiny random-init Llama, Qwen2 and DeepSeek-V3 models (fp32, CPU, no download);
each distinct prompt prefilled and stored once; the model left as it was found; clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers  # noqa: E402

import treeattn
import treeattn.hf  # noqa: E402
from treeattn.hf.generate import default_num_pages  # noqa: E402
from treeattn.hf.testing import FAMILIES, cache_bytes, tiny_model  # noqa: E402
from treeattn.testing import assert_close

PAD = 0
PAGE = 4  # prompts of 7 and 5 real tokens end mid-page


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=11)


def _padded_prompts(generator, lengths=(7, 5), vocab=128):
    """A left-padded batch: ``input_ids``, ``attention_mask`` ``[len(lengths), max(lengths)]``."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


def _both(model, ids, seed=0, **kwargs):
    """(model.generate, treeattn.hf.generate) on the same inputs, each from the same RNG state."""
    torch.manual_seed(seed)
    ref = model.generate(ids, pad_token_id=PAD, return_dict_in_generate=True, **kwargs)
    torch.manual_seed(seed)
    out = treeattn.hf.generate(model, ids, page_size=PAGE, pad_token_id=PAD, return_dict_in_generate=True, **kwargs)
    return ref, out


def _expected_tokens(lengths, rows_per_prompt, new_tokens):
    """(tokens stored, tokens one cache per row would store) after ``new_tokens`` steps without EOS: every
    row holds its prompt and all but its last new token (the last is never fed back)."""
    stored = sum(lengths) + len(lengths) * rows_per_prompt * (new_tokens - 1)
    unshared = sum(rows_per_prompt * (n + new_tokens - 1) for n in lengths)
    return stored, unshared


MODES = {
    "greedy": dict(do_sample=False, output_logits=True),
    "sample": dict(do_sample=True, num_return_sequences=3, temperature=1.3, top_k=40, top_p=0.95),
    "beam": dict(num_beams=3, num_return_sequences=2, output_scores=True),
}


@pytest.mark.parametrize("mode", MODES)
def test_same_sequences_as_model_generate(model, mode):
    g = torch.Generator().manual_seed(5)
    ids, mask = _padded_prompts(g)
    new = 5
    ref, out = _both(model, ids, seed=3, attention_mask=mask, max_new_tokens=new, **MODES[mode])
    assert torch.equal(out.sequences, ref.sequences)
    if mode == "greedy":  # every step's logits, not only their argmax
        assert_close(torch.stack(out.logits), torch.stack(ref.logits), torch.float32, what="logits")
    if mode == "beam":
        assert_close(out.sequences_scores, ref.sequences_scores, torch.float32, what="sequences_scores")
    cache = out.cache
    assert isinstance(cache, treeattn.hf.TreeCache) and isinstance(cache, transformers.Cache)
    stats = cache.stats()
    rows = max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))
    if mode != "beam":  # (beams fork and die, so only the bound holds)
        assert (stats["tokens_stored"], stats["tokens_if_unshared"]) == _expected_tokens((7, 5), rows, new)
    assert stats["leaves"] == len(cache.rows) == 2 * rows
    assert stats["tokens_stored"] < stats["tokens_if_unshared"] or rows == 1
    cache.release()
    assert cache.stats()["pages_used"] == 0


def test_single_prompt_sampling_and_eos_padding(model):
    """Rows that sample EOS early are padded with pad_token_id exactly as HF pads them."""
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(8))
    probe = model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=PAD)
    eos = int(probe[0, -1])  # greedy reaches it at step 3; sampled rows hit it at various steps or never
    kwargs = dict(do_sample=True, num_return_sequences=6, max_new_tokens=6, eos_token_id=eos, temperature=0.7)
    ref, out = _both(model, ids, seed=21, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    new = ref.sequences[:, ids.shape[1]:]
    finished_early = [(row[:-1] == eos).any().item() for row in new]
    assert any(finished_early), "the test wants a row that stopped early"
    for row in new[torch.tensor(finished_early)]:
        stop = (row == eos).nonzero()[0, 0]
        assert (row[stop + 1:] == PAD).all()


def _count_prompt_rows(model):
    """Records the input_ids shape of every forward of the base model."""
    shapes = []
    handle = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, handle


def test_each_distinct_prompt_prefilled_once():
    model = tiny_model("llama", seed=2)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(1, 128, (6,), generator=g) for _ in range(2))
    ids = torch.stack([a, b, a])  # prompt a twice: its rows are the same prompt
    shapes, handle = _count_prompt_rows(model)
    try:
        ref = model.generate(ids, do_sample=True, num_return_sequences=4, max_new_tokens=3, pad_token_id=PAD)
        assert shapes[0] == (12, 6)  # HF's own prefill: every expanded row
        shapes.clear()
        out = treeattn.hf.generate(model, ids, do_sample=True, num_return_sequences=4, max_new_tokens=3,
                                   pad_token_id=PAD, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert shapes[0] == (2, 6), "each distinct prompt prefilled once"
    assert all(s == (12, 1) for s in shapes[1:])
    assert out.sequences.shape == ref.shape
    stats = out.cache.stats()
    assert stats["tokens_stored"] == 2 * 6 + 12 * 2  # each distinct prompt stored once
    assert stats["tokens_if_unshared"] == 12 * (6 + 2)


def test_model_left_as_found_and_out_of_pages():
    model = tiny_model("qwen2", seed=4)
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with pytest.raises(treeattn.OutOfPages, match=r"num_pages=\d+ or more to treeattn.hf.generate"):
        treeattn.hf.generate(model, ids, do_sample=True, num_return_sequences=8, max_new_tokens=12,
                             pad_token_id=PAD, page_size=4, num_pages=6)
    assert model.config._attn_implementation == "eager" and "forward" not in vars(model)
    # The prompt through the model's own (eager) attention, decode through treeattn: still HF's sequences.
    ref = model.generate(ids, max_new_tokens=4, pad_token_id=PAD)
    assert torch.equal(treeattn.hf.generate(model, ids, max_new_tokens=4, pad_token_id=PAD), ref)
    assert model.config._attn_implementation == "eager" and "forward" not in vars(model)


def _gather_rows(cache):
    """Layer 0's stored K (GQA) or latent rows (MLA) along each row's path: a list of ``[length, ...]``."""
    pool = cache.layer_kv(0)["kv_cache" if cache.spec.mla else "k_cache"]
    flat = pool.reshape(-1, *pool.shape[2:])
    return [flat[cache.tree.path_slots(node)] for node in cache.rows]


def test_cache_operations_are_tree_operations(model):
    """batch_repeat_interleave / batch_select_indices / reorder_cache / crop move rows' paths like
    transformers' DynamicLayer moves their tensors, and never copy a shared prefix."""
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    out = treeattn.hf.generate(model, ids, do_sample=True, num_return_sequences=2, max_new_tokens=3,
                               pad_token_id=PAD, return_dict_in_generate=True, page_size=PAGE, num_pages=64)
    cache = out.cache  # (a pool with room for crop, which rebuilds rows unshared)
    before = _gather_rows(cache)
    stored = cache.stats()["tokens_stored"]
    cache.batch_repeat_interleave(2)
    assert [t.shape for t in _gather_rows(cache)] == [before[i].shape for i in range(4) for _ in range(2)]
    assert all(torch.equal(t, before[i // 2]) for i, t in enumerate(_gather_rows(cache)))
    assert cache.stats()["tokens_stored"] == stored  # forks share everything
    cache.reorder_cache(torch.tensor([7, 7, 0, 3, 3, 3, 5, 2]))
    picked = [before[i // 2] for i in (7, 7, 0, 3, 3, 3, 5, 2)]
    assert all(torch.equal(t, p) for t, p in zip(_gather_rows(cache), picked))
    cache.batch_select_indices(torch.tensor([1, 4, 6]))
    picked = [picked[i] for i in (1, 4, 6)]
    assert all(torch.equal(t, p) for t, p in zip(_gather_rows(cache), picked))
    length = cache.get_seq_length()
    cache.crop(-2)
    assert cache.get_seq_length() == length - 2
    assert all(torch.equal(t, p[:-2]) for t, p in zip(_gather_rows(cache), picked))
    with pytest.raises(ValueError, match="tokens_to_remove"):
        cache.crop(3)
    cache.release()
    assert cache.stats()["pages_used"] == 0 and cache.stats()["nodes"] == 0


def test_beam_search_never_runs_out_of_the_default_pool():
    """Beams fork and die every step: the pages only dropped beams read go back to the pool, so the default pool
    (what one cache per row holds, rounded up to pages) is never short, page by page or across pages."""
    model = tiny_model("llama", seed=6)
    g = torch.Generator().manual_seed(12)
    for ids, mask, page, new in [
        (torch.randint(1, 128, (1, 7), generator=g), None, 32, 40),  # beams that stay in one page a long time
        (*_padded_prompts(g), 4, 14),  # beams forking mid-page and across pages, a left-padded batch of two
    ]:
        kwargs = dict(num_beams=4, max_new_tokens=new, attention_mask=mask, pad_token_id=PAD, eos_token_id=None)
        ref = model.generate(ids, **kwargs)
        out = treeattn.hf.generate(model, ids, page_size=page, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, ref)
        stats = out.cache.stats()
        assert stats["num_pages"] == default_num_pages(ids.shape[0] * 4, ids.shape[1] + new, page)
        out.cache.release()
        assert out.cache.stats()["pages_used"] == 0


def test_default_pool_is_the_default_caches_memory_rounded_to_pages(model):
    """The default pool holds what model.generate's own cache holds (padding included), plus at most one
    partly filled page per row."""
    g = torch.Generator().manual_seed(13)
    ids, mask = _padded_prompts(g, lengths=(9, 4))
    rows = 2 * 3
    for kwargs in (dict(do_sample=True, num_return_sequences=3), dict(num_beams=3)):
        ref, out = _both(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, **kwargs)
        stats = out.cache.stats()
        per_token = stats["bytes_per_page"] // PAGE
        default = cache_bytes(ref.cache)
        assert default == rows * (ids.shape[1] + 6 - 1) * per_token  # (the memory one cache per row holds)
        pool = stats["num_pages"] * stats["bytes_per_page"]
        assert default <= pool < default + rows * PAGE * per_token
        assert stats["pages_used"] <= stats["num_pages"]
        out.cache.release()


def test_prompt_arguments_like_model_generate():
    """No input_ids starts from bos_token_id as model.generate does; an empty batch is an error naming input_ids;
    a torch.compile'd model is generated with the model under the wrapper, as its generate does."""
    model = tiny_model("llama", seed=9)
    ref = model.generate(max_new_tokens=4, bos_token_id=3, pad_token_id=PAD)
    assert ref.shape == (1, 5) and ref[0, 0] == 3
    assert torch.equal(treeattn.hf.generate(model, max_new_tokens=4, bos_token_id=3, pad_token_id=PAD), ref)
    assert torch.equal(treeattn.hf.generate(model, None, max_new_tokens=4, bos_token_id=3, pad_token_id=PAD), ref)
    empty = r"input_ids: expected a \[batch, length\] tensor with batch >= 1, got shape \[0, 5\]"
    with pytest.raises(ValueError, match=empty):
        treeattn.hf.generate(model, torch.ones(0, 5, dtype=torch.long), max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="input_ids: expected a .* or a bos_token_id"):
        treeattn.hf.generate(model, max_new_tokens=2, bos_token_id=None, pad_token_id=PAD)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model)
    ref = compiled.generate(ids, max_new_tokens=3, pad_token_id=PAD)
    assert torch.equal(treeattn.hf.generate(compiled, ids, max_new_tokens=3, pad_token_id=PAD), ref)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model)


def test_layers_keys_and_values_are_what_a_dynamic_layer_holds(model):
    """``cache.layers[i].keys`` / ``.values``: each row's KV at its positions, as model.generate's own cache holds
    it (where a row stores padding, 0); read-only."""
    g = torch.Generator().manual_seed(14)
    ids, mask = _padded_prompts(g)
    ref, out = _both(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_return_sequences=1)
    assert torch.equal(out.sequences, ref.sequences)
    real = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1).bool()  # the positions rows store
    for i in range(model.config.num_hidden_layers):
        mine, theirs = out.cache.layers[i], ref.cache.layers[i]
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert bool((a.transpose(1, 2)[~real] == 0).all())
            assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], torch.float32, what=f"layer {i} KV")
    with pytest.raises(AttributeError, match="keys: .* read-only"):
        out.cache.layers[0].keys = None
    out.cache.release()
    assert out.cache.layers[0].keys.shape[0] == 0


def test_unsupported_models_and_options():
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0)).eval()
    with pytest.raises(treeattn.hf.UnsupportedModel, match="encoder-decoder"):
        treeattn.hf.generate(t5, ids, max_new_tokens=2)
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16)).eval()
    with pytest.raises(treeattn.hf.UnsupportedModel, match="soft-capping"):
        treeattn.hf.generate(gemma2, ids, max_new_tokens=2)
    llama = tiny_model("llama", seed=1)
    with pytest.raises(treeattn.hf.UnsupportedModel, match="assistant_model"):
        treeattn.hf.generate(llama, ids, max_new_tokens=2, assistant_model=llama)
    with pytest.raises(treeattn.hf.UnsupportedModel, match="use_cache"):
        treeattn.hf.generate(llama, ids, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="cache: expected None"):
        treeattn.hf.generate(llama, ids, max_new_tokens=2, cache=transformers.DynamicCache())
    assert llama.config._attn_implementation == "sdpa" and "forward" not in vars(llama)


def test_sliding_window_only_within_the_window():
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=9,
    )
    mistral = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = mistral.generate(ids, max_new_tokens=3, pad_token_id=PAD)  # 8 tokens: inside the window
    assert torch.equal(treeattn.hf.generate(mistral, ids, max_new_tokens=3, pad_token_id=PAD), ref)
    with pytest.raises(treeattn.hf.UnsupportedModel,
                       match=r"sliding_window: expected every sequence within .* \(9 tokens\)"):
        treeattn.hf.generate(mistral, ids, max_new_tokens=8, pad_token_id=PAD)
    assert mistral.config._attn_implementation == "sdpa" and "forward" not in vars(mistral)


def test_attention_outside_generate_is_a_clear_error():
    model = tiny_model("llama", seed=0)
    model.set_attn_implementation("treeattn")
    with pytest.raises(RuntimeError, match="runs inside treeattn.hf.generate"):
        model(torch.randint(1, 128, (1, 4)))


def test_optional_dependency():
    """treeattn never imports transformers; treeattn.hf without it says how to install it."""
    code = (
        "import sys, pkgutil, importlib\n"
        "import treeattn\n"
        "for m in pkgutil.iter_modules(treeattn.__path__):\n"
        "    if m.name not in ('hf', 'triton_kernels'): importlib.import_module('treeattn.' + m.name)\n"
        "assert 'transformers' not in sys.modules, 'treeattn imported transformers'\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import treeattn.hf\n"
        "except ImportError as err:\n"
        "    assert 'pip install treeattn[hf]' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('treeattn.hf imported without transformers')\n"
    )
    env = {"TRITON_INTERPRET": "1", **os.environ}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
