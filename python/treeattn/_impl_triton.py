"""Triton backend: launches ``treeattn.triton_kernels`` (on GPU, or on CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

from ._dispatch import register

try:
    from treeattn import triton_kernels as _tk

    HAS_TRITON = True
except ImportError:  # triton missing or broken: the dispatcher falls back to the reference
    _tk = None
    HAS_TRITON = False


@register("tree_decode", "triton")
def tree_decode(q, k_cache, v_cache, plan, out, lse, workspace, sm_scale):
    partial_o, partial_lse = workspace
    _tk.tree_decode_stage1(
        q, k_cache, v_cache, plan.kv_indices,
        plan.item_page_ptr, plan.item_num_tokens, plan.item_row_ptr, plan.row_query, plan.row_dest,
        out, lse, partial_o, partial_lse, sm_scale, plan.max_queries_per_item,
    )
    _tk.merge_partials(partial_o, partial_lse, plan.merge_query, plan.merge_ptr, out, lse)


@register("merge_state", "triton")
def merge_state(o_a, lse_a, o_b, lse_b, out, lse_out):
    _tk.merge_state(o_a, lse_a, o_b, lse_b, out, lse_out)


@register("mla_tree_decode", "triton")
def mla_tree_decode(q, kv_cache, plan, out, lse, workspace, sm_scale):
    partial_o, partial_lse = workspace
    _tk.mla_tree_decode_stage1(
        q, kv_cache, plan.kv_indices,
        plan.item_page_ptr, plan.item_num_tokens, plan.item_row_ptr, plan.row_query, plan.row_dest,
        out, lse, partial_o, partial_lse, sm_scale, plan.max_queries_per_item,
    )
    # Stage 2 is the GQA merge: it depends only on (partials, lse), not on how stage 1 computed them.
    _tk.merge_partials(partial_o, partial_lse, plan.merge_query, plan.merge_ptr, out, lse)


@register("kv_write", "triton")
def kv_write(slots, k, v, pool, layer):
    # pool: the TreeKVCache's stacked [C, num_layers, num_pages, page_size, ...] (C = 2 for K/V, 1 for MLA).
    _tk.kv_write(slots, k, pool[0, layer], v, None if v is None else pool[1, layer])


@register("copy_pages", "triton")
def copy_pages(pool, src, dst, num_slots):
    _tk.copy_pages(pool.flatten(0, 1), src, dst, num_slots)
