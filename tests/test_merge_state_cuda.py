"""torch.ops.treeattn.merge_state_cuda (csrc/merge_state.cu) against the fp32 reference merge.

The ``gpu`` tests need a CUDA device and the built extension; the schema / fake-impl tests only need
the extension (they run on a CPU-only machine with a CUDA build of torch).
"""

import re

import pytest
import torch

from treeattn import _ext
from treeattn.reference import merge_state as ref_merge
from treeattn.testing import assert_close

DEVICE = "cuda"

needs_ext = pytest.mark.skipif(
    not _ext.HAS_CUDA_EXT, reason=f"treeattn._C not available: {_ext.load_error}"
)

NEG_INF = float("-inf")


def op(*args):
    return torch.ops.treeattn.merge_state_cuda(*args)


def make_inputs(n, H, D, dtype, gen, empty_frac=0.25):
    """Random states; about empty_frac of the rows have lse_a = -inf, lse_b = -inf, or both."""
    o_a = torch.randn(n, H, D, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    o_b = torch.randn(n, H, D, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    lse_a = (torch.randn(n, H, generator=gen) * 4).to(DEVICE)
    lse_b = (torch.randn(n, H, generator=gen) * 4).to(DEVICE)
    u = torch.rand(n, H, generator=gen).to(DEVICE)
    lse_a[u < empty_frac] = NEG_INF  # a empty (and both, where b is empty too)
    lse_b[(u >= empty_frac / 2) & (u < 1.5 * empty_frac)] = NEG_INF
    return o_a, lse_a, o_b, lse_b


def check(o_out, lse_out, o_a, lse_a, o_b, lse_b):
    o_ref, lse_ref = ref_merge(o_a, lse_a, o_b, lse_b)
    assert not torch.isnan(o_out).any()
    assert not torch.isnan(lse_out).any()
    assert_close(o_out, o_ref)
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse_out), empty)
    assert torch.equal(o_out[empty], torch.zeros_like(o_out[empty]))
    torch.testing.assert_close(lse_out[~empty], lse_ref[~empty], rtol=1e-5, atol=1e-5)


def run(o_a, lse_a, o_b, lse_b, out_dtype):
    n, H, D = o_a.shape
    o_out = torch.full((n, H, D), float("nan"), device=DEVICE, dtype=out_dtype)
    lse_out = torch.full((n, H), float("nan"), device=DEVICE)
    assert op(o_a, lse_a, o_b, lse_b, o_out, lse_out) is None
    return o_out, lse_out


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 512])
@pytest.mark.parametrize("H", [1, 3, 32])
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(dt, dt) for dt in DTYPES] + [(dt, torch.float32) for dt in DTYPES[1:]]
    + [(torch.float32, torch.bfloat16)],
)
def test_matches_fp32_merge(n, H, D, dtype, out_dtype):
    gen = torch.Generator().manual_seed(1000 * n + 10 * H + D)
    inputs = make_inputs(n, H, D, dtype, gen)
    o_out, lse_out = run(*inputs, out_dtype)
    check(o_out, lse_out, *inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_states(dtype):
    # rows: a empty, b empty, both empty, neither; o of an empty state holds NaN and must be ignored
    lse_a = torch.tensor([[NEG_INF, 0.5, NEG_INF, -1.0]], device=DEVICE)
    lse_b = torch.tensor([[2.0, NEG_INF, NEG_INF, 3.0]], device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    o_a = torch.randn(1, 4, 128, generator=gen).to(DEVICE, dtype)
    o_b = torch.randn(1, 4, 128, generator=gen).to(DEVICE, dtype)
    o_a[0, [0, 2]] = float("nan")
    o_b[0, [1, 2]] = float("nan")
    o_out, lse_out = run(o_a, lse_a, o_b, lse_b, dtype)
    check(o_out, lse_out, o_a, lse_a, o_b, lse_b)
    assert torch.equal(o_out[0, 0], o_b[0, 0])  # weight exactly 1
    assert torch.equal(o_out[0, 1], o_a[0, 1])
    assert torch.equal(lse_out[0, :3], torch.tensor([2.0, 0.5, NEG_INF], device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place(dtype):
    # o_out aliases o_a and lse_out aliases lse_a: the merge-into-accumulator use
    gen = torch.Generator().manual_seed(1)
    o_a, lse_a, o_b, lse_b = make_inputs(33, 8, 128, dtype, gen)
    expected = ref_merge(o_a, lse_a, o_b, lse_b)
    op(o_a, lse_a, o_b, lse_b, o_a, lse_a)
    assert_close(o_a, expected[0])
    empty = torch.isneginf(expected[1])
    assert torch.equal(torch.isneginf(lse_a), empty)
    torch.testing.assert_close(lse_a[~empty], expected[1][~empty], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned(dtype):
    gen = torch.Generator().manual_seed(2)
    n, H, D = 5, 6, 72
    big_a, lse_a, big_b, lse_b = make_inputs(n, H + 2, D + 1, dtype, gen)
    o_a = big_a[:, 1 : H + 1, 1:]  # strided rows starting one element off 16 bytes: scalar path
    o_b = big_b[:, :H, :D]
    lse_a = lse_a[:, 1 : H + 1]
    lse_b = lse_b.t().contiguous().t()[:, :H]  # column-major lse
    o_buf = torch.zeros(H, n, D + 8, device=DEVICE, dtype=dtype)
    o_out = o_buf.transpose(0, 1)[:, :, 8:]  # [n, H, D] view with permuted strides
    lse_out = torch.zeros(H, n, device=DEVICE).t()
    op(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    check(o_out, lse_out, o_a, lse_a, o_b, lse_b)
    assert torch.equal(o_buf[..., :8], torch.zeros_like(o_buf[..., :8]))  # nothing outside the view


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 36, 100])
def test_head_dim_not_a_vector_multiple(D, dtype):
    gen = torch.Generator().manual_seed(D)
    inputs = make_inputs(9, 5, D, dtype, gen)
    o_out, lse_out = run(*inputs, dtype)
    check(o_out, lse_out, *inputs)


@pytest.mark.gpu
def test_vectorised_rows_with_row_padding():
    # rows padded to 16-byte multiples keep the vector path; check it against the reference
    gen = torch.Generator().manual_seed(3)
    o_a, lse_a, o_b, lse_b = make_inputs(7, 4, 136, torch.bfloat16, gen)
    o_a, o_b = o_a[..., :128], o_b[..., :128]
    o_out, lse_out = run(o_a, lse_a, o_b, lse_b, torch.float32)
    check(o_out, lse_out, o_a, lse_a, o_b, lse_b)


@pytest.mark.gpu
def test_current_stream_and_cuda_graph():
    gen = torch.Generator().manual_seed(4)
    o_a, lse_a, o_b, lse_b = make_inputs(17, 32, 128, torch.bfloat16, gen)
    o_out = torch.empty_like(o_a)
    lse_out = torch.empty_like(lse_a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    torch.cuda.current_stream().wait_stream(stream)
    check(o_out, lse_out, o_a, lse_a, o_b, lse_b)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    for seed in (5, 6):
        new = make_inputs(17, 32, 128, torch.bfloat16, torch.Generator().manual_seed(seed))
        for dst, src in zip((o_a, lse_a, o_b, lse_b), new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        check(o_out, lse_out, o_a, lse_a, o_b, lse_b)


@pytest.mark.gpu
def test_zero_rows_and_zero_dim():
    e3 = torch.empty(0, 4, 64, device=DEVICE)
    e2 = torch.empty(0, 4, device=DEVICE)
    op(e3, e2, e3, e2, e3.clone(), e2.clone())
    o = torch.empty(3, 2, 0, device=DEVICE)
    lse_a = torch.tensor([[0.0, NEG_INF]] * 3, device=DEVICE)
    lse_out = torch.empty(3, 2, device=DEVICE)
    op(o, lse_a, o, lse_a.clone(), o.clone(), lse_out)
    torch.testing.assert_close(lse_out, ref_merge(o, lse_a, o, lse_a)[1])


@pytest.mark.gpu
def test_argument_errors():
    o = torch.zeros(2, 3, 64, device=DEVICE)
    lse = torch.zeros(2, 3, device=DEVICE)
    cases = [
        ((o, lse, o[:, :2], lse, o.clone(), lse.clone()), "o_b must have shape"),
        ((o, lse, o.half(), lse, o.clone(), lse.clone()), "o_b must have dtype"),
        ((o, lse.double(), o, lse, o.clone(), lse.clone()), "lse_a must be float32"),
        ((o, lse, o, lse[:, :2], o.clone(), lse.clone()), "lse_b must have shape"),
        ((o, lse, o, lse, o.clone().cpu(), lse.clone()), "o_out must be a CUDA tensor"),
        ((o, lse, o, lse, o.double(), lse.clone()), "o_out must be float32, float16 or bfloat16"),
        ((o, lse, o, lse, o.clone().transpose(1, 2).contiguous().transpose(1, 2), lse.clone()),
         "contiguous in the last dim"),
        ((o.int(), lse, o.int(), lse, o.clone(), lse.clone()), "o_a must be float32"),
        ((o[0], lse, o, lse, o.clone(), lse.clone()), "o_a must be [n, H, D]"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            op(*args)


@pytest.mark.gpu
def test_opcheck():
    gen = torch.Generator().manual_seed(7)
    o_a, lse_a, o_b, lse_b = make_inputs(3, 4, 128, torch.float16, gen)
    args = (o_a, lse_a, o_b, lse_b, torch.empty_like(o_a), torch.empty_like(lse_a))
    torch.library.opcheck(torch.ops.treeattn.merge_state_cuda.default, args)


# --- no GPU needed: the library loads and registers on a CPU-only machine ---------------------


@needs_ext
def test_schema_registered():
    schema = str(torch.ops.treeattn.merge_state_cuda.default._schema)
    assert schema == (
        "treeattn::merge_state_cuda(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, "
        "Tensor(a!) o_out, Tensor(b!) lse_out) -> ()"
    )


@needs_ext
def test_fake_impl_on_meta_tensors():
    def m(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    o = m(3, 4, 64, dtype=torch.bfloat16)
    assert op(o, m(3, 4), o, m(3, 4), m(3, 4, 64), m(3, 4)) is None


@needs_ext
def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        o = torch.empty(2, 3, 64, dtype=torch.float16)
        lse = torch.empty(2, 3)
        assert op(o, lse, o, lse, torch.empty(2, 3, 64), torch.empty(2, 3)) is None


def test_ext_import_reports_state():
    assert isinstance(_ext.HAS_CUDA_EXT, bool)
    assert (_ext.load_error is None) == _ext.HAS_CUDA_EXT
    if _ext.HAS_CUDA_EXT:
        for name in _ext.OPS:
            assert hasattr(torch.ops.treeattn, name)
