"""treeattn.mla_tree_decode (absorbed MLA over shared-prefix trees) against the fp32 reference.

CPU: the Triton kernel under TRITON_INTERPRET=1 (fp32/fp16; conftest sets it); GPU (``gpu`` marker): bf16,
DeepSeek shapes, CUDA-graph replay. Every cache has NaN in the slots no query attends, so a stray read shows
up; sizes stay tiny because the interpreter is slow at 576-wide heads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import treeattn
from treeattn import _dispatch
from treeattn.testing import (
    PagedTable,
    assert_close,
    check_decode,
    poisoned_cache,
    random_table,
    tree_table,
    workload_table,
)

DEEPSEEK_SCALE = 192 ** -0.5  # 1/sqrt(qk_nope + qk_rope) (mscale 1)
# (head_dim, v_head_dim) besides DeepSeek-V3's 576 = 512 + 64: a half-size 256 + 32, a small odd split, no rope.
SMALL_DIMS = [(288, 256), (80, 64), (72, 40), (64, 64)]


# --- DeepSeek-V3 shapes (576 / 512) over a small branch tree ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads", [1, 3, 16, 128])
def test_deepseek_shapes_tree(num_heads, dtype, device):
    g = torch.Generator().manual_seed(num_heads)
    # A shared 45-token prompt, 3 branches of 20 tokens, 2 sub-branches each of 7 (page 16: partial pages).
    table = tree_table([45, 20, 7], [1, 3, 2], 16, spare_pages=2, generator=g)
    check_decode(table, num_heads, 576, dtype, device, v_head_dim=512, seed=num_heads, sm_scale=DEEPSEEK_SCALE)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_page_sizes(page_size, device):
    g = torch.Generator().manual_seed(page_size)
    table = tree_table([70, 9], [1, 3], page_size, spare_pages=1, generator=g)
    plan = table.plan(num_qo_heads=16, num_kv_heads=1, device=device)
    assert plan.stats["unique_tokens"] < plan.stats["naive_tokens"] or page_size == 64
    check_decode(table, 16, 576, torch.float32, device, v_head_dim=512, seed=page_size, plan=plan)


@pytest.mark.parametrize("dims", SMALL_DIMS)
@pytest.mark.parametrize("num_heads", [1, 17, 63])
def test_other_head_dims(dims, num_heads, device):
    g = torch.Generator().manual_seed(dims[0] + num_heads)
    table = tree_table([33, 17], [1, 4], 16, spare_pages=1, generator=g)
    check_decode(table, num_heads, dims[0], torch.float32, device, v_head_dim=dims[1], seed=num_heads)


@pytest.mark.parametrize("dims", [(80, 64), (72, 40)], ids=["pow2_v", "odd_v"])
def test_v_split_over_two_programs(dims, device):
    """Stage 1 with V's columns split over two programs per tile (each recomputes Q·Kᵀ) equals the
    one-program tile and the reference, with a partial-state merge in play and an odd V width (masked)."""
    from treeattn.triton_kernels.mla_decode import mla_tree_decode as launch

    g = torch.Generator().manual_seed(dims[1])
    table = tree_table([40, 9], [1, 3], 16, spare_pages=1, generator=g).to(device)
    head_dim, v_dim = dims
    kv_cache = poisoned_cache(table, (head_dim,), torch.float32, device, generator=g)
    q = torch.randn(table.num_queries, 5, head_dim, generator=g).to(device)
    plan = table.plan(num_qo_heads=5, num_kv_heads=1, device=device)
    ref_o, ref_lse = table.reference(q, kv_cache, sm_scale=0.1, v_head_dim=v_dim)
    for v_split in (1, 2):
        out = torch.full((table.num_queries, 5, v_dim), float("nan"), device=device)
        lse = torch.full((table.num_queries, 5), float("nan"), device=device)
        launch(q, kv_cache, plan, out, lse, *plan.workspace(5, v_dim), 0.1, v_split=v_split)
        assert_close(out, ref_o, torch.float32, what=f"o (v_split={v_split})")
        assert_close(lse, ref_lse, torch.float32, what=f"lse (v_split={v_split})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_tables_with_empty_queries(dtype, device):
    """Random page lists from a small pool: repeats at other depths, identical and empty queries."""
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        table = random_table(9, 16, max_pages=5, pool_pages=12, empty_prob=0.25, generator=g)
        check_decode(table, 3, 80, dtype, device, v_head_dim=64, seed=seed)
    g = torch.Generator().manual_seed(7)
    table = random_table(5, 16, max_pages=3, pool_pages=8, empty_prob=0.3, generator=g)
    check_decode(table, 16, 576, dtype, device, v_head_dim=512, seed=7)


def test_all_queries_empty(device):
    table = PagedTable(
        torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
        torch.ones(3, dtype=torch.int32), 16, 2,
    )
    result = check_decode(table, 16, 576, torch.float32, device, v_head_dim=512)
    assert (result.out == 0).all() and torch.isneginf(result.lse).all()


def test_no_queries(device):
    table = PagedTable(torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                       torch.zeros(0, dtype=torch.int32), 16, 2)
    result = check_decode(table, 16, 576, torch.float32, device, v_head_dim=512)
    assert result.out.shape == (0, 16, 512) and result.lse.shape == (0, 16)


@pytest.mark.parametrize("plan_heads", [None, 1, 128])
def test_any_plan_is_exact(plan_heads, device):
    """The plan's head hint only sizes query blocks: a plan made for other head counts is still exact
    (e.g. 16-query items at 128 heads: the kernel splits them into query blocks x head blocks)."""
    g = torch.Generator().manual_seed(11)
    table = tree_table([40, 6], [1, 5], 16, generator=g)
    hints = {"num_qo_heads": plan_heads, "num_kv_heads": None if plan_heads is None else 1}
    check_decode(table, 128, 80, torch.float32, device, v_head_dim=64, seed=3, plan_kw=hints)
    check_decode(table, 3, 80, torch.float32, device, v_head_dim=64, seed=4, plan_kw=hints)


def test_long_shared_prefix_split_into_chunks(device):
    """A prompt long enough that the planner cuts it into several chunks (partials merged in stage 2)."""
    g = torch.Generator().manual_seed(5)
    table = tree_table([300, 5], [1, 2], 16, generator=g)
    plan = table.plan(num_qo_heads=16, num_kv_heads=1, num_sms=4, device=device)
    assert plan.stats["partial_rows"] > 0
    check_decode(table, 16, 80, torch.float32, device, v_head_dim=64, plan=plan)


def test_large_scores_stay_finite(device):
    """Scores of a few hundred (exp overflows fp32 past ~88 without the running max)."""
    g = torch.Generator().manual_seed(9)
    table = tree_table([50, 10], [1, 2], 16, generator=g)
    check_decode(table, 3, 80, torch.float32, device, v_head_dim=64, q_scale=8.0, sm_scale=1.0)


# --- hypothesis: random trees ----------------------------------------------------------------------------------


@st.composite
def _trees(draw):
    depth = draw(st.integers(1, 3))
    fanout = [draw(st.integers(1, 3)) for _ in range(depth)]
    tokens = [draw(st.integers(1, 40)) for _ in range(depth)]
    page_size = draw(st.sampled_from([1, 16, 64]))
    return tokens, fanout, page_size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tree=_trees(),
    num_heads=st.sampled_from([1, 3, 16, 17, 63, 128]),
    dims=st.sampled_from([(80, 64), (72, 40), (64, 64)]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    hint=st.booleans(),
    seed=st.integers(0, 2**16),
)
# (one query of one token whose LSE is near 0: its error is measured against the normaliser, not |lse|)
@example(tree=([1], [1], 1), num_heads=1, dims=(72, 40), dtype=torch.float32, hint=False, seed=25)
def test_random_trees(tree, num_heads, dims, dtype, hint, seed, device):
    tokens, fanout, page_size = tree
    g = torch.Generator().manual_seed(seed)
    table = tree_table(tokens, fanout, page_size, spare_pages=1, generator=g)
    hints = {} if hint else {"num_qo_heads": None, "num_kv_heads": None}
    check_decode(table, num_heads, dims[0], dtype, device, v_head_dim=dims[1], seed=seed, plan_kw=hints)


# --- API: out=, plan reuse, backends, custom-op registration ------------------------------------------------


def test_out_lse_out_and_plan_reuse(device):
    g = torch.Generator().manual_seed(3)
    table = tree_table([40, 8], [1, 3], 16, generator=g)
    plan = table.plan(num_qo_heads=16, num_kv_heads=1, device=device)
    kv = poisoned_cache(table, (576,), torch.float32, device, generator=g)
    out = torch.empty(3, 16, 512, device=device)
    lse_out = torch.empty(3, 16, device=device)
    for _layer in range(2):  # every layer reuses the plan (and its workspace)
        q = torch.randn(3, 16, 576, generator=g).to(device)
        o, lse = treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.07, out=out, lse_out=lse_out, return_lse=True)
        assert o is out and lse is lse_out
        ref_o, ref_lse = table.reference(q, kv, sm_scale=0.07)
        assert_close(out, ref_o)
        assert_close(lse_out, ref_lse, what="lse")
    assert isinstance(treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.07), torch.Tensor)


@pytest.fixture
def tiny_step(device):
    """(plan, kv_cache, q) of a 2-branch step: 3 heads, head_dim 80 = 64 + 16, fp32."""
    g = torch.Generator().manual_seed(4)
    table = tree_table([30, 5], [1, 2], 16, generator=g)
    kv = poisoned_cache(table, (80,), torch.float32, device, generator=g)
    return table.plan(num_qo_heads=3, num_kv_heads=1, device=device), kv, torch.randn(2, 3, 80, generator=g).to(device)


def test_reference_backend_agrees(tiny_step):
    plan, kv, q = tiny_step
    o1 = treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64)
    with _dispatch.force("reference"):
        o2 = treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64)
    assert_close(o1, o2)


def test_custom_op_registration(tiny_step, device):
    """Schema, fake (meta) kernel and mutation annotations of treeattn::mla_tree_decode_run."""
    plan, kv, q = tiny_step
    out = torch.empty(2, 3, 64, device=device)
    lse = torch.empty(2, 3, device=device)
    part_o, part_lse = plan.workspace(3, 64)
    args = (q, kv, plan.tensor_args(), out, lse, part_o, part_lse, 0.1, plan.page_size, plan.max_queries_per_item)
    torch.library.opcheck(
        torch.ops.treeattn.mla_tree_decode_run.default, args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph(tiny_step):
    """The op traces into one graph (custom op + fake impl, plan tensors as inputs) and gives the eager result."""
    plan, kv, q = tiny_step

    def step(q, kv):
        return treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64, return_lse=True)

    o_c, lse_c = torch.compile(step, backend="aot_eager", fullgraph=True)(q, kv)
    o_e, lse_e = step(q, kv)
    assert torch.equal(o_c, o_e) and torch.equal(lse_c, lse_e)


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.fixture
def small_case():
    g = torch.Generator().manual_seed(8)
    table = tree_table([20, 4], [1, 2], 16, generator=g)
    plan = table.plan(num_qo_heads=4, num_kv_heads=1, device="cpu")
    kv = torch.randn(table.num_pages, 16, 96, generator=g)
    q = torch.randn(2, 4, 96, generator=g)
    return q, kv, plan


def test_missing_sm_scale_names_deepseek_scale(small_case):
    q, kv, plan = small_case
    with pytest.raises((TypeError, ValueError), match=r"1/sqrt\(192\)"):
        treeattn.mla_tree_decode(q, kv, plan, v_head_dim=64)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="sm_scale"):
            treeattn.mla_tree_decode(q, kv, plan, sm_scale=bad, v_head_dim=64)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, kv: (q, kv[..., :80].contiguous()), r"kv_cache: expected head_dim 96 .*\[\d+, 16, 80\]"),
        (lambda q, kv: (q, kv.half()), r"kv_cache: expected dtype torch\.float32 .*got torch\.float16"),
        (lambda q, kv: (q.half(), kv), r"kv_cache: expected dtype torch\.float16 .*got torch\.float32"),
        (lambda q, kv: (q, kv.to("meta")), r"kv_cache: expected device cpu .*got meta"),
        (lambda q, kv: (q.int(), kv), r"q: expected dtype float16, bfloat16 or float32, got torch\.int32"),
        (lambda q, kv: (q[0], kv), r"q: expected 3 dims, got shape \[4, 96\]"),
        (lambda q, kv: (q, kv[:, :, None]), r"kv_cache: expected 3 dims"),
        (lambda q, kv: (q[:1], kv), r"q: expected 2 queries \(plan.num_queries\)"),
        (lambda q, kv: (q, kv[:, :8].contiguous()), r"kv_cache: expected page_size 16"),
        (lambda q, kv: (q, kv[:1]), r"kv_indices: expected page ids < kv_cache.shape\[0\]=1"),
        (lambda q, kv: (q[..., ::2], kv), r"q: expected 3 dims|q: expected the last dim contiguous"),
    ],
)
def test_bad_arguments(small_case, mutate, match):
    q, kv, plan = small_case
    q, kv = mutate(q, kv)
    with pytest.raises(ValueError, match=match):
        treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64)


def test_bad_v_head_dim_and_outputs(small_case):
    q, kv, plan = small_case
    for bad in (97, 0, 64.0, True):
        with pytest.raises(ValueError, match=r"v_head_dim: expected an int in 1\.\.96 \(q.shape\[2\]\), got"):
            treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=bad)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 4, 64\]"):
        treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64, out=torch.empty(2, 4, 96))
    with pytest.raises(ValueError, match=r"lse_out: expected shape \[2, 4\], dtype torch.float32"):
        treeattn.mla_tree_decode(q, kv, plan, sm_scale=0.1, v_head_dim=64, lse_out=torch.empty(2, 4).half())
    with pytest.raises(ValueError, match="plan: expected a treeattn.TreePlan"):
        treeattn.mla_tree_decode(q, kv, object(), sm_scale=0.1, v_head_dim=64)


# --- GPU: bf16, DeepSeek shapes, CUDA graphs ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("num_heads", [1, 3, 16, 128])
def test_gpu_bf16(num_heads, page_size):
    g = torch.Generator().manual_seed(num_heads * 7 + page_size)
    table = tree_table([700, 130, 41], [1, 4, 3], page_size, spare_pages=3, generator=g)
    check_decode(table, num_heads, 576, torch.bfloat16, "cuda", v_head_dim=512, seed=num_heads,
                 sm_scale=DEEPSEEK_SCALE)
    table = random_table(40, page_size, max_pages=max(2, 256 // page_size), pool_pages=max(8, 512 // page_size),
                         generator=g)
    check_decode(table, num_heads, 576, torch.bfloat16, "cuda", v_head_dim=512, seed=num_heads + 1,
                 sm_scale=DEEPSEEK_SCALE)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads", [16, 128])
def test_gpu_bestofn_workload(num_heads):
    table = workload_table("bestofN_P4k_N64_S256", 64, scale=0.25, generator=torch.Generator().manual_seed(0))
    check_decode(table, num_heads, 576, torch.bfloat16, "cuda", v_head_dim=512, seed=1, sm_scale=DEEPSEEK_SCALE)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Capture one step (out= and lse_out= given, workspace allocated before capture), replay on new q."""
    g = torch.Generator().manual_seed(2)
    table = tree_table([500, 60], [1, 8], 64, generator=g)
    plan = table.plan(num_qo_heads=16, num_kv_heads=1, device="cuda")
    kv = poisoned_cache(table, (576,), torch.bfloat16, "cuda", generator=g)
    q = torch.randn(8, 16, 576, generator=g).to("cuda", torch.bfloat16)
    out = torch.empty(8, 16, 512, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(8, 16, device="cuda")
    run = lambda: treeattn.mla_tree_decode(q, kv, plan, sm_scale=DEEPSEEK_SCALE, out=out, lse_out=lse)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: compiles the kernels, allocates the plan's workspace
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(2):
        q.copy_(torch.randn(8, 16, 576, generator=g).to("cuda", torch.bfloat16))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_o, ref_lse = table.reference(q, kv, sm_scale=DEEPSEEK_SCALE)
        assert_close(out, ref_o)
        assert_close(lse, ref_lse, torch.bfloat16, "lse")
