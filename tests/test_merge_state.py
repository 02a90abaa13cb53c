"""merge_state (public op, every available backend) against the fp32 formula, -inf rows included."""

import pytest
import torch

import treeattn
from treeattn import _dispatch
from treeattn.testing import assert_close


def _states(n, heads, head_dim, dtype, device):
    o_a = torch.randn(n, heads, head_dim, device=device).to(dtype)
    o_b = torch.randn(n, heads, head_dim, device=device).to(dtype)
    lse_a = torch.randn(n, heads, device=device) * 4
    lse_b = torch.randn(n, heads, device=device) * 4
    lse_a[0, 0] = float("-inf")  # one side empty
    lse_b[-1, -1] = float("-inf")
    if n > 1:
        lse_a[1, :] = float("-inf")  # both sides empty: o = 0, lse = -inf
        lse_b[1, :] = float("-inf")
    return o_a, lse_a, o_b, lse_b


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 3, 128), (17, 32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_state_matches_formula(backend, shape, dtype, device):
    o_a, lse_a, o_b, lse_b = _states(*shape, dtype, device)
    with _dispatch.force(backend):
        o, lse = treeattn.merge_state(o_a, lse_a, o_b, lse_b)
    expected_lse = torch.logaddexp(lse_a, lse_b)
    both_empty = torch.isneginf(expected_lse)
    safe = torch.where(both_empty, 0.0, expected_lse)
    expected = o_a.float() * torch.exp(lse_a - safe)[..., None] + o_b.float() * torch.exp(lse_b - safe)[..., None]
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o[both_empty] == 0).all() and torch.isneginf(lse[both_empty]).all()
    assert_close(o, expected, dtype)
    assert torch.allclose(lse[~both_empty], expected_lse[~both_empty], rtol=1e-6, atol=1e-6)


def test_merge_of_split_kv_equals_attention_over_the_union(device):
    """Attention over prefix ∪ suffix equals the merge of the two halves' states."""
    from treeattn.testing import tree_table

    table = tree_table([48, 16], [1, 1], 16).to(device)
    q = torch.randn(1, 4, 64, device=device)
    k = torch.randn(table.num_pages, 16, 4, 64, device=device)
    v = torch.randn_like(k)
    ref = treeattn.reference
    whole, whole_lse = ref.tree_decode(q, k, v, table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    one = torch.tensor([0, 3], dtype=torch.int32, device=device)
    full = torch.tensor([16], dtype=torch.int32, device=device)
    o_a, lse_a = ref.tree_decode(q, k, v, one, table.kv_indices[:3], full)
    o_b, lse_b = ref.tree_decode(q, k, v, torch.tensor([0, 1], dtype=torch.int32, device=device), table.kv_indices[3:], full)
    o, lse = treeattn.merge_state(o_a, lse_a, o_b, lse_b)
    assert_close(o, whole)
    assert_close(lse, whole_lse, 1e-6, "lse")


def test_merge_state_errors(device):
    o = torch.randn(2, 3, 64, device=device)
    lse = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match=r"o_b: expected shape \[2, 3, 64\] \(same as o_a\), got \[2, 3, 32\]"):
        treeattn.merge_state(o, lse, o[..., :32].contiguous(), lse)
    with pytest.raises(ValueError, match=r"lse_b: expected an fp32 tensor, got torch.float16"):
        treeattn.merge_state(o, lse, o, lse.half())
    with pytest.raises(ValueError, match=r"lse_a: expected shape \[2, 3\], got \[2\]"):
        treeattn.merge_state(o, lse[:, 0].contiguous(), o, lse)
    with pytest.raises(ValueError, match=r"o_b: expected dtype torch.float32 \(same as o_a\), got torch.float16"):
        treeattn.merge_state(o, lse, o.half(), lse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_state_cuda_backend(dtype):
    o_a, lse_a, o_b, lse_b = _states(17, 32, 128, dtype, torch.device("cuda"))
    with _dispatch.force("cuda"):
        o, lse = treeattn.merge_state(o_a, lse_a, o_b, lse_b)
    with _dispatch.force("reference"):
        o_ref, lse_ref = treeattn.merge_state(o_a, lse_a, o_b, lse_b)
    assert_close(o, o_ref, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))


@pytest.mark.parametrize("backend", ["triton", "reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nan_in_a_state_propagates_and_empty_states_give_zero(backend, device):
    o_a, lse_a, o_b, lse_b = _states(4, 2, 64, torch.float32, device)
    lse_a[0, 0], lse_b[0, 0] = float("nan"), 1.0  # NaN lse: NaN out, NaN lse
    o_a[2, 1, 5] = float("nan")  # NaN in a non-empty state's o
    lse_a[3], lse_b[3] = float("-inf"), float("-inf")  # both empty, o holds NaN: ignored
    o_a[3], o_b[3] = float("nan"), float("nan")
    with _dispatch.force(backend):
        o, lse = treeattn.merge_state(o_a, lse_a, o_b, lse_b)
    assert torch.isnan(o[0, 0]).all() and torch.isnan(lse[0, 0])
    assert torch.isnan(o[2, 1, 5]) and not torch.isnan(lse[2, 1])
    assert (o[3] == 0).all() and torch.isneginf(lse[3]).all()


def test_bf16_on_cpu_in_the_interpreter_names_o_a():
    if treeattn.backend_for("merge_state", "cpu") != "triton":
        pytest.skip("the Triton interpreter does not serve CPU here")
    o_a, lse_a, o_b, lse_b = _states(2, 2, 64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"o_a: expected float16 or float32 for Triton on CPU .* got torch.bfloat16"):
        treeattn.merge_state(o_a, lse_a, o_b, lse_b)
