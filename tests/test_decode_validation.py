"""The decode ops' argument checks and their one prepared path: FP8 scales read as laid out, scales past
fp32, inputs that require grad, cache layouts that look like HND, plan devices, backend messages, and the
prepared launches kept on the plan (also by the registered op)."""

import os
import subprocess
import sys
import typing

import pytest
import torch

import treeattn
from treeattn import reference
from treeattn._dispatch import force
from treeattn.decode import mla_tree_decoder, tree_decoder
from treeattn.plan import plan_of
from treeattn.testing import assert_close, fp8_cache, poisoned_cache, tree_table


def _table(device):
    return tree_table([27, 6], [1, 3], 16).to(device)


def _plan(table, **kw):
    return treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=table.page_size, **kw)


def _fp8_step(device, num_kv_heads=4):
    table = _table(device)
    q = torch.randn(table.num_queries, 2 * num_kv_heads, 32, device=device, dtype=torch.float16)
    cache, _ = fp8_cache(table, (num_kv_heads, 32), torch.float8_e4m3fn, device)
    return table, q, cache


def _reference(table, q, cache, k_scale, v_scale):
    o, lse = reference.tree_decode(q, cache, cache, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                                   k_scale=k_scale, v_scale=v_scale)
    return o, lse


# ---- FP8 scales: any strides, read as laid out ---------------------------------------------------------------


def _strided_scales(device, factor=1.0):
    """Per-KV-head scales [4] as a stride-2 view, an expanded stride-0 tensor and a stride-3 column."""
    return {
        "every_other": (torch.tensor([1.0, 7.0, 2.0, 9.0, 0.5, 3.0, 4.0, 8.0], device=device) * factor)[::2],
        "expanded": (torch.tensor([3.0], device=device) * factor).expand(4),
        "column": (torch.tensor([0.25, 1.5, 6.0, 2.0], device=device) * factor)[:, None].repeat(1, 3)[:, 0],
    }


@pytest.mark.parametrize("which", ["every_other", "expanded", "column"])
def test_non_contiguous_fp8_scales_give_the_reference_answer(which, device):
    table, q, cache = _fp8_step(device)
    v_scale = (torch.rand(8, device=device) + 0.5)[1::2]
    plan = _plan(table)
    for factor in (1.0, 2.0):  # the first call prepares the step; the second runs the kept one with new values
        k_scale = _strided_scales(device, factor)[which]
        assert not k_scale.is_contiguous()
        o, lse = treeattn.tree_decode(q, cache, cache, plan, k_scale=k_scale, v_scale=v_scale, return_lse=True)
        o_ref, lse_ref = _reference(table, q, cache, k_scale.contiguous(), v_scale.contiguous())
        assert_close(o, o_ref)
        assert_close(lse, lse_ref, what="lse")


def test_non_contiguous_scales_through_the_registered_op(device):
    table, q, cache = _fp8_step(device)
    k_scale = _strided_scales(device)["every_other"]
    plan = _plan(table)
    compiled = torch.compile(lambda q, c, s: treeattn.tree_decode(q, c, c, plan, k_scale=s, v_scale=s),
                             fullgraph=True, backend="eager")
    o_ref, _ = _reference(table, q, cache, k_scale.contiguous(), k_scale.contiguous())
    assert_close(compiled(q, cache, k_scale), o_ref)


# ---- scalars past fp32 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1e39, 3.5e38, 1e-50, float("1e308")])
def test_sm_scale_must_be_representable_in_fp32(bad, device):
    table = _table(device)
    q = torch.randn(table.num_queries, 4, 32, device=device)
    k = poisoned_cache(table, (2, 32), torch.float32, device)
    with pytest.raises(ValueError, match=r"sm_scale: expected a positive number representable in fp32 .*got"):
        treeattn.tree_decode(q, k, k, _plan(table), sm_scale=bad)
    with pytest.raises(ValueError, match=r"sm_scale: expected a positive number representable in fp32"):
        treeattn.mla_tree_decode(q, k[:, :, 0], _plan(table), sm_scale=bad, v_head_dim=16)


@pytest.mark.parametrize("bad", [1e39, 1e-50])
def test_fp8_scale_must_be_representable_in_fp32(bad, device):
    table, q, cache = _fp8_step(device)
    plan = _plan(table)
    with pytest.raises(ValueError, match=r"k_scale: expected a positive number representable in fp32"):
        treeattn.tree_decode(q, cache, cache, plan, k_scale=bad, v_scale=1.0)
    with pytest.raises(ValueError, match=r"v_scale: expected a positive number representable in fp32"):
        treeattn.tree_decode(q, cache, cache, plan, k_scale=1.0, v_scale=bad)
    with pytest.raises(ValueError, match=r"kv_scale: expected a positive number representable in fp32"):
        treeattn.mla_tree_decode(q, cache[:, :, 0], plan, sm_scale=0.1, v_head_dim=16, kv_scale=bad)


def test_largest_fp32_scale_is_accepted(device):
    table, q, cache = _fp8_step(device)
    big = float(torch.finfo(torch.float32).max)
    treeattn.tree_decode(q, cache, cache, _plan(table), k_scale=1.0, v_scale=1.0, sm_scale=1e-38 * 4)
    with pytest.raises(ValueError, match="k_scale"):
        treeattn.tree_decode(q, cache, cache, _plan(table), k_scale=big * 1.01, v_scale=1.0)


# ---- no backward: inputs that require grad are refused, unless grad mode is off -----------------------------


def _gqa(device):
    table = _table(device)
    q = torch.randn(table.num_queries, 4, 32, device=device)
    k = poisoned_cache(table, (2, 32), torch.float32, device)
    return table, q, k, _plan(table)


def test_query_that_requires_grad_is_refused(device):
    table, q, k, plan = _gqa(device)
    treeattn.tree_decode(q, k, k, plan)  # a step kept for this layout must not let a grad query through
    with pytest.raises(ValueError, match=r"q: expected a tensor that does not require grad .*no backward.*"
                                         r"torch.no_grad\(\).*got requires_grad=True"):
        treeattn.tree_decode(q.requires_grad_(), k, k, plan)
    with pytest.raises(ValueError, match=r"q: expected a tensor that does not require grad"):
        treeattn.mla_tree_decode(q, k[:, :, 0], plan, sm_scale=0.1, v_head_dim=16)


@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
def test_cache_that_requires_grad_is_refused(name, device):
    table, q, k, plan = _gqa(device)
    caches = {"k_cache": k, "v_cache": k.clone()}
    caches[name] = caches[name].clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"{name}: expected a tensor that does not require grad"):
        treeattn.tree_decode(q, **caches, plan=plan)
    with pytest.raises(ValueError, match=r"kv_cache: expected a tensor that does not require grad"):
        treeattn.mla_tree_decode(q, k[:, :, 0].clone().requires_grad_(), plan, sm_scale=0.1, v_head_dim=16)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_grad_inputs_run_where_grad_mode_is_off(mode, device):
    table, q, k, plan = _gqa(device)
    q.requires_grad_()
    with mode():
        o = treeattn.tree_decode(q, k, k, plan)
        o2 = treeattn.tree_decode(q, k, k, plan)
    o_ref, _ = reference.tree_decode(q.detach(), k, k, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert_close(o, o_ref)
    assert_close(o2, o_ref)
    with pytest.raises(ValueError, match=r"q: expected a tensor that does not require grad"):
        treeattn.tree_decode(q, k, k, plan)  # grad mode back on: refused, not a kept step


def test_merge_state_refuses_grad_inputs(device):
    o = torch.randn(3, 2, 8, device=device)
    lse = torch.randn(3, 2, device=device)
    with pytest.raises(ValueError, match=r"o_b: expected a tensor that does not require grad"):
        treeattn.merge_state(o, lse, o.clone().requires_grad_(), lse)
    with torch.no_grad():
        treeattn.merge_state(o, lse, o.clone().requires_grad_(), lse)


# ---- layouts that blame the right argument ------------------------------------------------------------------


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(4, 2), (32, 8), (3, 3)])
def test_hnd_cache_is_named_as_a_layout_mistake(num_qo_heads, num_kv_heads, device):
    table = _table(device)
    q = torch.randn(table.num_queries, num_qo_heads, 32, device=device)
    nhd = poisoned_cache(table, (num_kv_heads, 32), torch.float32, device)
    hnd = nhd.transpose(1, 2).contiguous()  # [pages, Hkv, page_size, D]
    plan = _plan(table)
    with pytest.raises(ValueError, match=r"k_cache: expected NHD layout \[num_pages, page_size, num_kv_heads, "
                                         r"head_dim\] with page_size 16 \(from plan\) in dim 1, got shape "
                                         rf"\[{table.num_pages}, {num_kv_heads}, 16, 32\], which looks like HND"):
        treeattn.tree_decode(q, hnd, hnd, plan)
    o = treeattn.tree_decode(q, hnd.transpose(1, 2), hnd.transpose(1, 2), plan)  # the suggested view works
    o_ref, _ = reference.tree_decode(q, nhd, nhd, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    assert_close(o, o_ref)


# ---- plan(device=) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error", [("foo", ValueError), (True, TypeError), ("meta", ValueError),
                                        (3.5, ValueError)])
def test_plan_device_is_named(bad, error):
    table = _table("cpu")
    with pytest.raises(error, match=rf"device: expected a CPU or CUDA torch.device or device string .*got {bad!r}"):
        _plan(table, device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plan_on_cuda_without_a_gpu_says_so():
    table = _table("cpu")
    with pytest.raises(ValueError, match=r"device: expected an available device, got 'cuda' but CUDA is not "
                                         r"available \(torch.cuda.is_available\(\) is False\)"):
        _plan(table, device="cuda")


# ---- backends -----------------------------------------------------------------------------------------------


def test_backends_say_available_in_words():
    status = treeattn.backends("cpu")
    assert status["reference"] == "available"
    assert all(isinstance(v, str) and v for v in status.values())


def test_forced_triton_on_cpu_without_the_interpreter_names_triton_interpret():
    script = ("import torch, treeattn\n"
              "try:\n    treeattn.backend_for('tree_decode', 'cpu')\n"
              "except ValueError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TREEATTN_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "TREEATTN_BACKEND: expected a backend available for tree_decode on cpu" in out
    assert "got 'triton' (triton: CPU needs TRITON_INTERPRET=1 set before triton is imported)" in out


# ---- one prepared path: launches kept on the plan, reused by the registered op --------------------------------


def test_prepared_steps_live_on_the_plan(device):
    table, q, k, plan = _gqa(device)
    assert plan.prepared == {}
    for _ in range(3):
        treeattn.tree_decode(q, k, k, plan)
        treeattn.mla_tree_decode(q, k[:, :, 0], plan, sm_scale=0.1, v_head_dim=16)
    assert len(plan.prepared) == 2  # one step per (op, layout), made on the first call
    treeattn.tree_decode(q, k, k.clone(), plan, sm_scale=0.3)
    assert len(plan.prepared) == 3


def test_registered_op_finds_the_plan_and_reuses_its_launches(device):
    table, q, k, plan = _gqa(device)
    assert plan_of(plan.tensor_args()) is plan
    assert plan_of([t.clone() for t in plan.tensor_args()]) is None
    compiled = torch.compile(lambda q, k: treeattn.tree_decode(q, k, k, plan) * 2.0, fullgraph=True, backend="eager")
    o_ref, _ = reference.tree_decode(q, k, k, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    for _ in range(3):
        assert_close(compiled(q, k), 2.0 * o_ref)
    registered = [key for key in plan.prepared if key[0] == "registered"]
    assert len(registered) == 1


def test_return_lse_overloads():
    for op in (treeattn.tree_decode, treeattn.mla_tree_decode):
        returns = [typing.get_type_hints(f)["return"] for f in typing.get_overloads(op)]
        assert returns == [torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


# ---- a step's decoder: every layer's call over one plan, checked once --------------------------------------


def _layers(table, tail, num_layers, device):
    """``num_layers`` per-layer views of one NaN-poisoned pool (as ``TreeKVCache.layer`` gives them)."""
    pool = torch.stack([poisoned_cache(table, tail, torch.float32, "cpu") for _ in range(num_layers)])
    return pool.to(device).unbind(0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_decoder_gives_the_op_bits(kind, backend, device):
    """``tree_decoder(plan)`` / ``mla_tree_decoder(plan)`` called for each layer gives the op's output and LSE bit
    for bit: the scratch LSE, a returned one, caller outputs, and a call of another layout part-way (a strided
    query, then the first layout again)."""
    table = _table(device)
    plan = _plan(table)
    g = torch.Generator().manual_seed(3)
    if kind == "gqa":
        caches = [(k, k.flip(-1)) for k in _layers(table, (2, 32), 3, device)]
        decoder, op, options = tree_decoder(plan), treeattn.tree_decode, {"sm_scale": 0.2}
    else:
        caches = [(kv,) for kv in _layers(table, (40,), 3, device)]
        decoder, op, options = mla_tree_decoder(plan), treeattn.mla_tree_decode, {"sm_scale": 0.2, "v_head_dim": 24}
    assert decoder.plan is plan
    with force(backend):
        for i, layer in enumerate((0, 1, 2, 1, 0)):
            step = 2 if i == 2 else 1
            q = torch.randn(table.num_queries * step, 4, caches[0][0].shape[-1], generator=g).to(device)[::step]
            o_ref, lse_ref = op(q, *caches[layer], plan, return_lse=True, **options)
            assert torch.equal(decoder(q, *caches[layer], **options), o_ref)
            o, lse = decoder(q, *caches[layer], return_lse=True, **options)
            assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
            out, lse_out = torch.empty_like(o_ref), torch.empty_like(lse_ref)
            assert decoder(q, *caches[layer], out=out, lse_out=lse_out, **options) is out
            assert torch.equal(out, o_ref) and torch.equal(lse_out, lse_ref)
        assert not torch.isnan(o_ref).any()


def test_decoder_checks_like_the_op(device):
    """A call whose layout differs from the prepared one is checked in full (the op's error, after prepared
    calls too), and a failing call keeps the prepared step: the next call of that layout gives the same bits."""
    table, q, k, plan = _gqa(device)
    decoder = tree_decoder(plan)
    with pytest.raises(ValueError, match="plan: expected a treeattn.TreePlan"):
        tree_decoder(object())
    first = decoder(q, k, k)
    kept = decoder._key, decoder._step
    with pytest.raises(ValueError, match=r"k_cache: expected head_dim 16 \(q.shape\[2\]\) in dim 3"):
        decoder(q[:, :, :16], k, k)
    with pytest.raises(ValueError, match=r"v_cache: expected shape \[.*\] \(same as k_cache\)"):
        decoder(q, k, k[:, :, :1])
    with pytest.raises(ValueError, match="q: expected a tensor that does not require grad"):
        decoder(q.clone().requires_grad_(), k, k)
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 4, 32\]"):
        decoder(q, k, k, out=torch.empty(3, 4, 31, device=device))
    with pytest.raises(ValueError, match="sm_scale: expected a finite positive"):
        decoder(q, k, k, sm_scale=-1.0)
    with pytest.raises(TypeError, match="sm_scale: required for MLA"):
        mla_tree_decoder(plan)(q, k[:, :, 0])
    assert (decoder._key, decoder._step) == kept
    assert torch.equal(decoder(q, k, k), first)


def test_decoder_under_compile_is_the_op(device):
    """Inside ``torch.compile`` the decoder calls the op (its registered form), with the op's answer."""
    table, q, k, plan = _gqa(device)
    decoder = tree_decoder(plan)
    compiled = torch.compile(lambda q, k: decoder(q, k, k) * 2.0, fullgraph=True, backend="eager")
    for _ in range(2):
        assert_close(compiled(q, k), 2.0 * treeattn.tree_decode(q, k, k, plan))
    assert decoder._step is None
