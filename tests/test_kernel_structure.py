"""The stage-1 kernels' shared pieces, seen from outside: one empty-KV rule for both families (0 / -inf, NaN
kept), a V split chosen from V's width so that every valid ``v_head_dim`` runs on every tile, and a tile table
that never splits V below ``tl.dot``'s minimum. CPU: the kernels under TRITON_INTERPRET=1."""

from __future__ import annotations

import types

import pytest
import torch

import treeattn
from treeattn.testing import assert_close, poisoned_cache, tree_table
from treeattn.triton_kernels import configs, gqa_decode, mla_decode


def _one_item_plan(num_tokens: int, page_size: int = 16):
    """A hand-made plan of one work item over page 0 (``num_tokens`` tokens) read by query 0 alone."""
    i32 = lambda *values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    return types.SimpleNamespace(
        kv_indices=i32(0), item_page_ptr=i32(0), item_num_tokens=i32(num_tokens), item_row_ptr=i32(0, 1),
        row_query=i32(0), row_dest=i32(-1), merge_query=i32(), merge_ptr=i32(0), max_queries_per_item=1,
    )


def _run_family(family: str, plan, cache: torch.Tensor, num_heads: int = 4, head_dim: int = 32):
    q = torch.randn(1, num_heads, head_dim)
    out = torch.full((1, num_heads, head_dim), 7.0)
    lse = torch.full((1, num_heads), 7.0)
    workspace = (torch.empty(0, num_heads, head_dim), torch.empty(0, num_heads))
    if family == "gqa":
        kv = cache.view(1, 16, 1, head_dim)
        gqa_decode.tree_decode(q, kv, kv, plan, out, lse, *workspace, 0.3)
    else:
        mla_decode.mla_tree_decode(q, cache.view(1, 16, head_dim), plan, out, lse, *workspace, 0.3)
    return out, lse


@pytest.mark.parametrize("family", ["gqa", "mla"])
def test_empty_item_gives_zero_and_neg_inf_in_both_families(family):
    """A work item without tokens: l == 0 in stage 1, so o = 0 and lse = -inf (not 0/0), in GQA as in MLA."""
    out, lse = _run_family(family, _one_item_plan(0), torch.randn(16, 32))
    assert bool((out == 0).all()), out
    assert bool(torch.isneginf(lse).all()), lse


@pytest.mark.parametrize("family", ["gqa", "mla"])
def test_nan_in_a_read_token_reaches_the_output_in_both_families(family):
    """The empty-row guard must not hide a NaN: a NaN key among the item's tokens makes every row NaN."""
    cache = torch.randn(16, 32)
    cache[3, 0] = float("nan")
    out, lse = _run_family(family, _one_item_plan(5), cache)
    assert bool(torch.isnan(out).all()) and bool(torch.isnan(lse).all())


@pytest.mark.parametrize("v_head_dim", [1, 16, 31])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn], ids=["fp32", "fp8"])
def test_mla_small_v_head_dim_on_64_row_tiles(v_head_dim, kv_dtype):
    """Every v_head_dim in 1..head_dim runs on the 64-row tiles whose 512-wide V the table splits (16 heads x
    4 queries; FP8 splits at any head count), and matches the reference."""
    num_heads, head_dim = 16, 64
    g = torch.Generator().manual_seed(v_head_dim)
    table = tree_table([40, 9], [1, 4], 16, spare_pages=1, generator=g)
    plan = treeattn.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=16,
                         num_pages=table.num_pages, num_qo_heads=num_heads, num_kv_heads=1)
    assert plan.max_queries_per_item == 4  # 16 heads x 4 queries: a 64-row tile
    kv_cache = poisoned_cache(table, (head_dim,), torch.float32, "cpu", generator=g)
    scale = {}
    if kv_dtype != torch.float32:
        kv_cache, scale = kv_cache.to(kv_dtype), {"kv_scale": 0.5}
    q = torch.randn(table.num_queries, num_heads, head_dim, generator=g)
    o, lse = treeattn.mla_tree_decode(q, kv_cache, plan, sm_scale=0.2, v_head_dim=v_head_dim, return_lse=True,
                                      **scale)
    ref_o, ref_lse = treeattn.reference.mla_tree_decode(
        q, kv_cache, table.kv_indptr, table.kv_indices, table.kv_last_page_len, sm_scale=0.2,
        v_head_dim=v_head_dim, **scale,
    )
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_lse, torch.float32, "lse")


def test_tile_table_never_splits_v_below_the_dot_minimum():
    """Whatever the V width, head count, dtype or tile rows, the table's V split leaves each program a V part
    tl.dot can take."""
    for width in (16, 32, 64, 128, 256, 512, 1024):
        for group in (1, 2, 4, 8, 16, 32, 64, 128):
            for dtype in ("fp16", "bf16", "fp32", "float8_e4m3fn", "float8_e5m2"):
                for rows in (16, 32, 64, 128):
                    config = configs.tile_config("mla_decode", 90, width, group, dtype, rows)
                    assert config.v_split in (1, 2)
                    assert width // config.v_split >= configs.MIN_DOT, (width, group, dtype, rows, config)


def test_mla_v_split_knob_out_of_range_names_the_argument():
    """The tile sweeps' explicit knob is checked (the table never makes such a split)."""
    plan = _one_item_plan(5)
    q, cache = torch.randn(1, 4, 32), torch.randn(1, 16, 32)
    out, lse = torch.empty(1, 4, 16), torch.empty(1, 4)
    with pytest.raises(ValueError, match="v_split: expected 1, or 2 for a V of 32 columns or more, got 2"):
        mla_decode.mla_tree_decode(q, cache, plan, out, lse, torch.empty(0, 4, 16), torch.empty(0, 4), 0.3,
                                   v_split=2)
