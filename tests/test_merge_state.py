"""merge_state on every backend (the fp32 reference, the Triton kernel, the CUDA extension ``csrc/merge_state.cu``)
against the fp32 reference merge: through the public op, and through each backend's implementation with the
layouts the op's contract leaves to it (another output dtype, strided views, outputs aliasing inputs); empty
(-inf) and NaN states; the CUDA op's schema, fake kernel and errors.
"""

import re

import pytest
import torch

import treeattn
from treeattn import _dispatch, _ext
from treeattn.reference import merge_state as ref_merge
from treeattn.testing import assert_close

NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext])


def _backend_cases(values, uses_bf16=lambda value: value == torch.bfloat16):
    """(backend, value) params for every backend, with the markers each case needs: the CUDA backend a GPU
    and the extension; Triton in bfloat16 a GPU (the interpreter computes with numpy, which has no bfloat16)."""
    cases = []
    for backend in _dispatch.BACKEND_ORDER:
        for value in values:
            marks = [pytest.mark.gpu, pytest.mark.cuda_ext] if backend == "cuda" else []
            if backend == "triton" and uses_bf16(value):
                marks = [pytest.mark.gpu]
            cases.append(pytest.param(backend, value, marks=marks, id=f"{backend}-{value}".replace("torch.", "")))
    return cases


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu")


def _states(n, heads, head_dim, dtype, device, generator=None, empty_frac=0.25):
    """Random states ``o: [n, heads, head_dim]``, ``lse: [n, heads]``; about ``empty_frac`` of the rows have
    lse_a = -inf, lse_b = -inf, or both; always a empty at row 0 head 0, b empty at the last row's last head,
    both empty in row 1."""
    g = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    o_a = torch.randn(n, heads, head_dim, generator=g).to(device, dtype)
    o_b = torch.randn(n, heads, head_dim, generator=g).to(device, dtype)
    lse_a = torch.randn(n, heads, generator=g) * 4
    lse_b = torch.randn(n, heads, generator=g) * 4
    u = torch.rand(n, heads, generator=g)
    lse_a[u < empty_frac] = NEG_INF
    lse_b[(u >= empty_frac / 2) & (u < 1.5 * empty_frac)] = NEG_INF
    if n * heads:
        lse_a[0, 0], lse_b[-1, -1] = NEG_INF, NEG_INF
    if n > 1:
        lse_a[1], lse_b[1] = NEG_INF, NEG_INF
    return o_a, lse_a.to(device), o_b, lse_b.to(device)


def _check(o_out, lse_out, o_a, lse_a, o_b, lse_b, lse_tol=1e-6):
    """The merged state equals the fp32 reference merge: o within its dtype's tolerance, lse within ``lse_tol``,
    empty rows exactly 0 / -inf, no NaN."""
    o_ref, lse_ref = ref_merge(o_a, lse_a, o_b, lse_b)
    empty = torch.isneginf(lse_ref)
    assert not torch.isnan(o_out).any() and not torch.isnan(lse_out).any()
    assert torch.equal(torch.isneginf(lse_out), empty)
    assert (o_out[empty] == 0).all()
    assert_close(o_out, o_ref)
    assert_close(lse_out[~empty], lse_ref[~empty], lse_tol, "lse")


def _run_backend(backend, o_a, lse_a, o_b, lse_b, out_dtype=None):
    """The backend's implementation (below the public op's checks) into fresh NaN-filled outputs."""
    n, heads, head_dim = o_a.shape
    o_out = torch.full((n, heads, head_dim), float("nan"), device=o_a.device, dtype=out_dtype or o_a.dtype)
    lse_out = torch.full((n, heads), float("nan"), device=o_a.device)
    _dispatch.implementation("merge_state", o_a.device, backend)(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    return o_out, lse_out


# --- the public op ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype", _backend_cases(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 3, 128), (17, 32, 64), (17, 32, 128)])
def test_public_op_matches_reference(backend, dtype, shape):
    inputs = _states(*shape, dtype, _device(backend))
    with _dispatch.force(backend):
        o, lse = treeattn.merge_state(*inputs)
    assert o.dtype == dtype and lse.dtype == torch.float32
    _check(o, lse, *inputs)


def test_reference_merge_is_the_formula(device):
    """The oracle itself, against lse = log(exp(lse_a) + exp(lse_b)), o = Σ o·exp(lse − lse_total)."""
    o_a, lse_a, o_b, lse_b = _states(9, 4, 32, torch.float32, device)
    o, lse = ref_merge(o_a, lse_a, o_b, lse_b)
    expected_lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(expected_lse), 0.0, expected_lse)
    expected = o_a * torch.exp(lse_a - safe)[..., None] + o_b * torch.exp(lse_b - safe)[..., None]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected_lse))
    assert_close(o, expected)
    finite = ~torch.isneginf(expected_lse)
    assert_close(lse[finite], expected_lse[finite], 1e-6, "lse")


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA])
def test_nan_in_a_state_propagates_and_empty_states_give_zero(backend):
    o_a, lse_a, o_b, lse_b = _states(4, 2, 64, torch.float32, _device(backend), empty_frac=0.0)
    lse_a[0, 0], lse_b[0, 0] = float("nan"), 1.0  # NaN lse: NaN out, NaN lse
    o_a[2, 1, 5] = float("nan")  # NaN in a non-empty state's o
    lse_a[3], lse_b[3] = NEG_INF, NEG_INF  # both empty, o holds NaN: ignored
    o_a[3], o_b[3] = float("nan"), float("nan")
    with _dispatch.force(backend):
        o, lse = treeattn.merge_state(o_a, lse_a, o_b, lse_b)
    assert torch.isnan(o[0, 0]).all() and torch.isnan(lse[0, 0])
    assert torch.isnan(o[2, 1, 5]) and not torch.isnan(lse[2, 1])
    assert (o[3] == 0).all() and torch.isneginf(lse[3]).all()


def test_merge_of_split_kv_equals_attention_over_the_union(device):
    """Attention over prefix ∪ suffix equals the merge of the two halves' states."""
    from treeattn.testing import tree_table

    table = tree_table([48, 16], [1, 1], 16).to(device)
    q = torch.randn(1, 4, 64, device=device)
    k = torch.randn(table.num_pages, 16, 4, 64, device=device)
    v = torch.randn_like(k)
    ref = treeattn.reference
    whole, whole_lse = table.reference(q, k, v)
    one = torch.tensor([0, 3], dtype=torch.int32, device=device)
    full = torch.tensor([16], dtype=torch.int32, device=device)
    o_a, lse_a = ref.tree_decode(q, k, v, one, table.kv_indices[:3], full)
    one_b = torch.tensor([0, 1], dtype=torch.int32, device=device)
    o_b, lse_b = ref.tree_decode(q, k, v, one_b, table.kv_indices[3:], full)
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


@pytest.mark.interpreter
def test_bf16_on_cpu_in_the_interpreter_names_o_a():
    o_a, lse_a, o_b, lse_b = _states(2, 2, 64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"o_a: expected float16 or float32 for Triton on CPU .* got torch.bfloat16"):
        treeattn.merge_state(o_a, lse_a, o_b, lse_b)


# --- each backend's implementation: output dtypes, layouts, aliasing ----------------------------------------------

DTYPE_PAIRS = (
    [(dt, dt) for dt in DTYPES] + [(dt, torch.float32) for dt in DTYPES[1:]] + [(torch.float32, torch.bfloat16)]
)


@pytest.mark.parametrize("backend, dtypes", _backend_cases(DTYPE_PAIRS, uses_bf16=lambda pair: torch.bfloat16 in pair))
@pytest.mark.parametrize("head_dim", [64, 128, 512])
@pytest.mark.parametrize("heads", [1, 3, 32])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_backend_matches_reference(backend, dtypes, n, heads, head_dim):
    dtype, out_dtype = dtypes
    gen = torch.Generator().manual_seed(1000 * n + 10 * heads + head_dim)
    inputs = _states(n, heads, head_dim, dtype, _device(backend), gen)
    o_out, lse_out = _run_backend(backend, *inputs, out_dtype=out_dtype)
    assert o_out.dtype == out_dtype
    _check(o_out, lse_out, *inputs)


@pytest.mark.parametrize("backend, dtype", _backend_cases(DTYPES))
def test_empty_states_contribute_nothing(backend, dtype):
    # rows: a empty, b empty, both empty, neither; o of an empty state holds NaN and must be ignored
    device = _device(backend)
    lse_a = torch.tensor([[NEG_INF, 0.5, NEG_INF, -1.0]], device=device)
    lse_b = torch.tensor([[2.0, NEG_INF, NEG_INF, 3.0]], device=device)
    gen = torch.Generator().manual_seed(0)
    o_a = torch.randn(1, 4, 128, generator=gen).to(device, dtype)
    o_b = torch.randn(1, 4, 128, generator=gen).to(device, dtype)
    o_a[0, [0, 2]] = float("nan")
    o_b[0, [1, 2]] = float("nan")
    o_out, lse_out = _run_backend(backend, o_a, lse_a, o_b, lse_b)
    _check(o_out, lse_out, o_a, lse_a, o_b, lse_b)
    assert torch.equal(o_out[0, 0], o_b[0, 0])  # weight exactly 1
    assert torch.equal(o_out[0, 1], o_a[0, 1])
    assert torch.equal(lse_out[0, :3], torch.tensor([2.0, 0.5, NEG_INF], device=device))


@pytest.mark.parametrize("backend, dtype", _backend_cases(DTYPES))
def test_in_place(backend, dtype):
    # o_out aliases o_a and lse_out aliases lse_a: the merge-into-accumulator use
    o_a, lse_a, o_b, lse_b = _states(33, 8, 128, dtype, _device(backend), torch.Generator().manual_seed(1))
    inputs = [t.clone() for t in (o_a, lse_a, o_b, lse_b)]
    _dispatch.implementation("merge_state", o_a.device, backend)(o_a, lse_a, o_b, lse_b, o_a, lse_a)
    _check(o_a, lse_a, *inputs, lse_tol=1e-5)


@pytest.mark.parametrize("backend, dtype", _backend_cases(DTYPES))
def test_strided_and_misaligned_views(backend, dtype):
    n, heads, head_dim = 5, 6, 72
    big_a, lse_a, big_b, lse_b = _states(n, heads + 2, head_dim + 1, dtype, _device(backend),
                                         torch.Generator().manual_seed(2))
    o_a = big_a[:, 1 : heads + 1, 1:]  # strided rows starting one element off 16 bytes: scalar path
    o_b = big_b[:, :heads, :head_dim]
    lse_a = lse_a[:, 1 : heads + 1]  # row-strided lse
    lse_b = lse_b[:, :heads]
    o_buf = torch.zeros(heads, n, head_dim + 8, device=o_a.device, dtype=dtype)
    o_out = o_buf.transpose(0, 1)[:, :, 8:]  # [n, H, D] view with permuted strides
    lse_out = torch.zeros(n, heads + 3, device=o_a.device)[:, 3:]
    _dispatch.implementation("merge_state", o_a.device, backend)(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    _check(o_out, lse_out, o_a, lse_a, o_b, lse_b, lse_tol=1e-5)
    assert torch.equal(o_buf[..., :8], torch.zeros_like(o_buf[..., :8]))  # nothing outside the view


@pytest.mark.parametrize("backend, dtype", _backend_cases(DTYPES))
@pytest.mark.parametrize("head_dim", [1, 36, 100])
def test_head_dim_not_a_vector_multiple(backend, dtype, head_dim):
    inputs = _states(9, 5, head_dim, dtype, _device(backend), torch.Generator().manual_seed(head_dim))
    _check(*_run_backend(backend, *inputs), *inputs)


@pytest.mark.parametrize("backend, dtype", _backend_cases([torch.bfloat16]))
def test_vectorised_rows_with_row_padding(backend, dtype):
    # rows padded to 16-byte multiples keep the CUDA kernel's vector path
    o_a, lse_a, o_b, lse_b = _states(7, 4, 136, dtype, _device(backend), torch.Generator().manual_seed(3))
    o_a, o_b = o_a[..., :128], o_b[..., :128]
    _check(*_run_backend(backend, o_a, lse_a, o_b, lse_b, out_dtype=torch.float32), o_a, lse_a, o_b, lse_b)


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA])
def test_zero_rows_and_zero_head_dim(backend):
    device = _device(backend)
    run = _dispatch.implementation("merge_state", device, backend)
    e3 = torch.empty(0, 4, 64, device=device)
    e2 = torch.empty(0, 4, device=device)
    run(e3, e2, e3, e2, e3.clone(), e2.clone())
    o = torch.empty(3, 2, 0, device=device)
    lse_a = torch.tensor([[0.0, NEG_INF]] * 3, device=device)
    lse_out = torch.full((3, 2), float("nan"), device=device)
    run(o, lse_a, o, lse_a.clone(), o.clone(), lse_out)
    assert torch.equal(lse_out, ref_merge(o, lse_a, o, lse_a)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)])
def test_current_stream_and_cuda_graph(backend):
    g = torch.Generator().manual_seed(4)
    o_a, lse_a, o_b, lse_b = _states(17, 32, 128, torch.bfloat16, torch.device("cuda"), g)
    o_out = torch.empty_like(o_a)
    lse_out = torch.empty_like(lse_a)
    run = _dispatch.implementation("merge_state", o_a.device, backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    torch.cuda.current_stream().wait_stream(stream)
    _check(o_out, lse_out, o_a, lse_a, o_b, lse_b)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(o_a, lse_a, o_b, lse_b, o_out, lse_out)
    for seed in (5, 6):
        new = _states(17, 32, 128, torch.bfloat16, torch.device("cuda"), torch.Generator().manual_seed(seed))
        for dst, src in zip((o_a, lse_a, o_b, lse_b), new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        _check(o_out, lse_out, o_a, lse_a, o_b, lse_b)


# --- the CUDA op (torch.ops.treeattn.merge_state_cuda) ---------------------------------------------------------


def cuda_op(*args):
    return torch.ops.treeattn.merge_state_cuda(*args)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_op_takes_column_major_lse(dtype):
    """The CUDA kernel reads lse through both strides (the public op asks for a contiguous last dim)."""
    n, heads = 5, 6
    o_a, lse_a, o_b, lse_b = _states(n, heads, 72, dtype, torch.device("cuda"), torch.Generator().manual_seed(2))
    lse_b = lse_b.t().contiguous().t()  # column-major
    o_out = torch.empty_like(o_a)
    lse_out = torch.zeros(heads, n, device="cuda").t()
    assert cuda_op(o_a, lse_a, o_b, lse_b, o_out, lse_out) is None
    _check(o_out, lse_out, o_a, lse_a, o_b, lse_b, lse_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_op_argument_errors():
    o = torch.zeros(2, 3, 64, device="cuda")
    lse = torch.zeros(2, 3, device="cuda")
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
            cuda_op(*args)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_op_opcheck():
    o_a, lse_a, o_b, lse_b = _states(3, 4, 128, torch.float16, torch.device("cuda"), torch.Generator().manual_seed(7))
    args = (o_a, lse_a, o_b, lse_b, torch.empty_like(o_a), torch.empty_like(lse_a))
    torch.library.opcheck(torch.ops.treeattn.merge_state_cuda.default, args)


@pytest.mark.cuda_ext
def test_cuda_op_schema_registered():
    schema = str(torch.ops.treeattn.merge_state_cuda.default._schema)
    assert schema == (
        "treeattn::merge_state_cuda(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, "
        "Tensor(a!) o_out, Tensor(b!) lse_out) -> ()"
    )


@pytest.mark.cuda_ext
def test_cuda_op_fake_impl_on_meta_tensors():
    def m(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    o = m(3, 4, 64, dtype=torch.bfloat16)
    assert cuda_op(o, m(3, 4), o, m(3, 4), m(3, 4, 64), m(3, 4)) is None


@pytest.mark.cuda_ext
def test_cuda_op_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        o = torch.empty(2, 3, 64, dtype=torch.float16)
        lse = torch.empty(2, 3)
        assert cuda_op(o, lse, o, lse, torch.empty(2, 3, 64), torch.empty(2, 3)) is None


def test_ext_import_reports_state():
    assert isinstance(_ext.HAS_CUDA_EXT, bool)
    assert (_ext.load_error is None) == _ext.HAS_CUDA_EXT
    if _ext.HAS_CUDA_EXT:
        for name in _ext.OPS:
            assert hasattr(torch.ops.treeattn, name)
