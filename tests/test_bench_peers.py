"""The benchmark's peers and byte model: each peer that can run on CPU matches the fp32 reference on the same
tables and caches (the split-KV Triton decode in the interpreter, SDPA, flex_attention unfused), the cascade
levels rebuild every query's page list, the byte model charges both methods alike, and a CPU run lists every
peer as skipped with its reason."""

import json
import sys
from pathlib import Path

import pytest
import torch

from treeattn import reference
from treeattn.testing import WORKLOADS, assert_close, poisoned_cache, random_table, tree_table, workload_table

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_mla  # noqa: E402
import bench_tree_decode  # noqa: E402
import peers  # noqa: E402
import run_all  # noqa: E402
import splitkv_triton  # noqa: E402
import summary  # noqa: E402


def _gqa(table, num_qo_heads, num_kv_heads, head_dim, g):
    q = torch.randn(table.num_queries, num_qo_heads, head_dim, generator=g)
    k = poisoned_cache(table, (num_kv_heads, head_dim), torch.float32, "cpu", generator=g)
    v = poisoned_cache(table, (num_kv_heads, head_dim), torch.float32, "cpu", generator=g)
    return q, k, v


def _ptrs(table):
    return table.kv_indptr, table.kv_indices, table.kv_last_page_len


# ---- split-KV Triton decode -------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size,num_qo_heads,num_kv_heads,splits", [
    (16, 8, 2, 1), (16, 8, 2, 3), (1, 7, 7, 2), (16, 20, 1, 5), (64, 3, 1, 64)])
def test_splitkv_matches_reference_on_a_tree(page_size, num_qo_heads, num_kv_heads, splits):
    g = torch.Generator().manual_seed(page_size + splits)
    table = tree_table([37, 19, 3], [1, 3, 2], page_size, generator=g)
    q, k, v = _gqa(table, num_qo_heads, num_kv_heads, 32, g)
    ref, _ = reference.tree_decode(q, k, v, *_ptrs(table), sm_scale=0.3)
    out = splitkv_triton.splitkv_decode(q, k, v, *_ptrs(table), num_splits=splits, sm_scale=0.3, block_n=16)
    assert_close(out, ref)


def test_splitkv_matches_reference_on_random_tables_with_empty_queries():
    g = torch.Generator().manual_seed(3)
    table = random_table(17, 4, empty_prob=0.3, generator=g)
    assert (table.kv_indptr[1:] == table.kv_indptr[:-1]).any(), "the table should have an empty query"
    q, k, v = _gqa(table, 4, 2, 16, g)
    ref, _ = reference.tree_decode(q, k, v, *_ptrs(table))
    assert_close(splitkv_triton.splitkv_decode(q, k, v, *_ptrs(table), num_splits=4, block_n=16), ref)


def test_splitkv_fp16_matches_reference():
    g = torch.Generator().manual_seed(4)
    table = workload_table("tree_2k_4x1k_4x512_4x128", 16, scale=1 / 64, generator=g)
    q, k, v = (x.half() for x in _gqa(table, 8, 2, 64, g))
    ref, _ = reference.tree_decode(q, k, v, *_ptrs(table))
    assert_close(splitkv_triton.splitkv_decode(q, k, v, *_ptrs(table), num_splits=2, block_n=16), ref, torch.float16)


@pytest.mark.parametrize("num_heads", [16, 20])
def test_splitkv_mla_matches_reference(num_heads):
    """Absorbed MLA at a reduced width (latent 64 + rope 16): V is the latent part of the one cache."""
    g = torch.Generator().manual_seed(num_heads)
    table = tree_table([40, 9], [1, 3], 16, generator=g)
    kv = poisoned_cache(table, (80,), torch.float32, "cpu", generator=g)
    q = torch.randn(table.num_queries, num_heads, 80, generator=g)
    ref, _ = reference.mla_tree_decode(q, kv, *_ptrs(table), sm_scale=0.2, v_head_dim=64)
    case = peers.Case(q, kv, None, table, 0.2, rope_dim=16)
    assert_close(peers.splitkv_triton(case, num_splits=3)(), ref)


def test_splitkv_rejects_a_cache_beyond_int32_offsets():
    table = tree_table([5], [1], 4)
    q = torch.zeros(1, 2, 16, device="meta")
    huge = torch.empty_strided((2**20, 4, 1, 16), (2**12, 16, 16, 1), device="meta")  # offsets reach 2**32
    with pytest.raises(ValueError, match=r"k_cache: expected fewer than 2\*\*31 elements"):
        splitkv_triton.splitkv_decode(q, huge, huge, *_ptrs(table), num_splits=1)


def test_splitkv_rejects_a_head_dim_that_is_not_a_power_of_two():
    table = tree_table([5], [1], 4)
    q, k, v = torch.zeros(1, 2, 24), torch.zeros(table.num_pages, 4, 1, 24), torch.zeros(table.num_pages, 4, 1, 24)
    with pytest.raises(ValueError, match="head_dim: expected a power of two, got 24"):
        splitkv_triton.splitkv_decode(q, k, v, *_ptrs(table), num_splits=1)


def test_default_num_splits_fills_the_machine_without_tiny_splits():
    assert splitkv_triton.default_num_splits(1, 1, 4, 8192, 64) == 32  # few programs: split up to 4 tiles each
    assert splitkv_triton.default_num_splits(256, 8, 4, 8192, 64) == 1  # enough programs already
    assert splitkv_triton.default_num_splits(1, 1, 4, 10, 64) == 1


# ---- torch peers ----------------------------------------------------------------------------------------

def test_sdpa_duplicated_matches_reference():
    g = torch.Generator().manual_seed(5)
    table = tree_table([21, 5], [1, 3], 4, generator=g)
    q, k, v = _gqa(table, 6, 2, 16, g)
    ref, _ = reference.tree_decode(q, k, v, *_ptrs(table))
    assert_close(peers.sdpa_duplicated(peers.Case(q, k, v, table, 16 ** -0.5))(), ref)


def test_flex_attention_ancestor_mask_matches_reference():
    """Unfused flex_attention (the CPU path) scores the whole pool before masking, so the unused slots hold
    zeros here rather than NaN; the fused GPU kernel skips the masked blocks."""
    g = torch.Generator().manual_seed(6)
    table = tree_table([21, 5, 2], [1, 2, 2], 4, spare_pages=2, generator=g)
    q, k, v = (torch.nan_to_num(x) for x in _gqa(table, 4, 2, 16, g))
    ref, _ = reference.tree_decode(q, k, v, *_ptrs(table))
    with pytest.warns(UserWarning):  # "flex_attention called without torch.compile()"
        out = peers.flex_attention(peers.Case(q, k, v, table, 16 ** -0.5), compile=False)()
    assert_close(out, ref)


def test_ancestor_mask_marks_exactly_each_querys_path():
    table = tree_table([5, 3], [1, 2], 4, shuffle=False)
    mask = peers.ancestor_mask(table)
    for i in range(table.num_queries):
        assert mask[i].nonzero().flatten().tolist() == table.token_slots(i).tolist()


def test_time_peers_records_times_errors_skips_and_the_best_peer(monkeypatch):
    """The GPU path's bookkeeping, with the timer stubbed (CPU): a peer whose answer differs from treeattn's is
    not timed, one outside TREEATTN_PEERS is listed as skipped, the fastest timed peer is the best."""
    g = torch.Generator().manual_seed(8)
    table = tree_table([9, 3], [1, 2], 4, generator=g)
    q, k, v = _gqa(table, 4, 2, 16, g)
    ref, _ = reference.tree_decode(q, k, v, *_ptrs(table))
    case = peers.Case(q, k, v, table, 16 ** -0.5)
    fake = {"right": (lambda c: lambda: ref.clone(), False), "wrong": (lambda c: lambda: ref + 1, False),
            "slow": (lambda c: lambda: ref.clone(), True), "unwanted": (lambda c: lambda: ref.clone(), False)}
    times = {True: 30.0, False: 20.0}
    monkeypatch.setattr(peers.common, "time_us", lambda fn, graph=True: times[graph])
    monkeypatch.setenv("TREEATTN_PEERS", "right, wrong,slow")
    row = {"treeattn_us": 10.0}
    peers.time_peers(row, case, fake, reference=ref)
    assert row["right_us"] == 20.0 and row["slow_us"] == 30.0 and "wrong_us" not in row
    assert row["wrong_error"].startswith("output differs from treeattn's")
    assert row["peers_skipped"] == {"unwanted": "not in TREEATTN_PEERS"}
    assert row["best_peer"] == "right" and row["speedup_vs_best_peer"] == 2.0


# ---- FlashInfer cascade levels ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WORKLOADS))
def test_cascade_levels_rebuild_every_querys_pages(name):
    table = workload_table(name, 16, scale=1 / 16, generator=torch.Generator().manual_seed(7))
    fanout = WORKLOADS[name][1]
    levels = peers.cascade_levels(table, fanout)
    assert len(levels) == len(fanout)
    rebuilt = [[] for _ in range(table.num_queries)]
    for depth, (qo, kv_indptr, kv_indices, last_len) in enumerate(levels):
        assert qo[-1] == table.num_queries and kv_indptr[-1] == kv_indices.numel()
        for node in range(qo.numel() - 1):
            own = kv_indices[kv_indptr[node]:kv_indptr[node + 1]].tolist()
            for i in range(qo[node], qo[node + 1]):
                rebuilt[i] += own
        if depth < len(fanout) - 1:
            assert (last_len == 16).all(), "a shared level holds full pages only"
        else:
            assert torch.equal(last_len, table.kv_last_page_len)
    for i in range(table.num_queries):
        assert rebuilt[i] == table.kv_indices[table.kv_indptr[i]:table.kv_indptr[i + 1]].tolist()
    # The prompt is one level shared by all queries: its full pages are read once.
    assert int(levels[0][1][-1]) == int(WORKLOADS[name][0][0] / 16) // 16


def test_cascade_levels_reject_a_fanout_that_is_not_the_tree():
    table = tree_table([16, 4], [1, 3], 4)
    with pytest.raises(ValueError, match="fanout: expected a tree whose leaves are the 3 queries"):
        peers.cascade_levels(table, [1, 2, 2])


# ---- byte model -----------------------------------------------------------------------------------------

def _gqa_plans(table):
    return bench_tree_decode._plan(table), bench_tree_decode._plan(table, share_prefixes=False)


def test_byte_model_without_sharing_reads_the_same_bytes_either_way():
    gqa = bench_tree_decode.byte_model(*_gqa_plans(tree_table([4096], [128], 16)))
    assert gqa["treeattn_bytes"] == gqa["per_branch_bytes"]
    table = bench_mla.ROWS["plain_B128_L4k"](torch.Generator().manual_seed(0))
    for heads in bench_mla.HEAD_COUNTS:
        plan = bench_mla._plan(table, heads)
        mla = bench_mla.byte_model(plan, bench_mla._plan(table, heads, share_prefixes=False), heads)
        assert mla["treeattn_bytes"] == mla["per_branch_bytes"], heads


def test_byte_model_charges_both_methods_their_partial_states():
    shared, per_branch = _gqa_plans(workload_table("bestofN_P4k_N64_S256", 16))
    bytes_ = bench_tree_decode.byte_model(shared, per_branch)
    no_partials = bench_tree_decode.kv_bytes(per_branch.stats["naive_tokens"]) + bench_tree_decode.qo_bytes(64)
    assert per_branch.stats["partial_rows"] > 0 and bytes_["per_branch_bytes"] > no_partials
    assert bytes_["unique_bytes"] < bytes_["treeattn_bytes"] < bytes_["per_branch_bytes"]


# ---- CPU run and summary ----------------------------------------------------------------------------------

def test_summary_says_when_both_methods_move_the_same_bytes(tmp_path):
    row = {"workload": "plain", "unique_bytes": 90, "treeattn_bytes": 100, "per_branch_bytes": 100}
    (tmp_path / "mla.json").write_text(json.dumps({"env": {}, "rows": [row]}))
    text, _ = summary.write_summary(tmp_path)
    assert "the same bytes as per-branch decode; 1.11× the unique bytes" in text


def test_cpu_rows_list_every_peer_as_skipped_and_the_summary_says_why(tmp_path):
    rows = bench_tree_decode.run_cpu(["bestofN_P4k_N64_S256"])
    assert rows[0]["peers_skipped"] == {name: peers.NO_GPU for name in peers.GQA_PEERS}
    (tmp_path / "tree_decode.json").write_text(json.dumps({"env": {"peers": peers.versions()}, "rows": rows}))
    text, _ = summary.write_summary(tmp_path)
    line = next(ln for ln in text.splitlines() if "peers not timed" in ln)
    assert "flashinfer_cascade" in line and "splitkv_triton" in line and "skipped: no GPU" in line
    assert "Peers: flashinfer" in text


def test_summary_states_the_ratio_to_the_best_peer(tmp_path):
    row = {"workload": "w", "unique_bytes": 1, "treeattn_bytes": 2, "per_branch_bytes": 4, "floor_us": 5.0,
           "treeattn_us": 10.0, "splitkv_triton_us": 40.0, "flashinfer_cascade_us": 25.0,
           "flashinfer_decode_error": "RuntimeError: boom", "best_peer": "flashinfer_cascade",
           "speedup_vs_best_peer": 2.5}
    (tmp_path / "tree_decode.json").write_text(json.dumps({"env": {}, "rows": [row]}))
    text, _ = summary.write_summary(tmp_path)
    assert "| treeattn vs the best peer (GPU) | 2.50× faster | best peer: flashinfer_cascade (25.0 µs) |" in text
    assert "| peers not timed | flashinfer_decode | failed: RuntimeError: boom |" in text


def test_run_all_help_states_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "then one summary (``summary.md`` + PNG plots, see ``summary.py``) printed at the end." in text
    assert "ignored by git" in text
