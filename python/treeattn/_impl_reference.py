"""Reference backend: the fp32 oracle behind the op signatures (CPU without the Triton interpreter)."""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import register


@register("tree_decode", "reference")
def tree_decode(q, k_cache, v_cache, plan, out, lse, workspace, sm_scale):
    o_ref, lse_ref = reference.tree_decode(
        q, k_cache, v_cache, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, sm_scale=sm_scale
    )
    out.copy_(o_ref)
    lse.copy_(lse_ref)


@register("merge_state", "reference")
def merge_state(o_a, lse_a, o_b, lse_b, out, lse_out):
    o, lse = reference.merge_state(o_a, lse_a, o_b, lse_b)
    out.copy_(o)
    lse_out.copy_(lse)


@register("mla_tree_decode", "reference")
def mla_tree_decode(q, kv_cache, plan, out, lse, workspace, sm_scale):
    o_ref, lse_ref = reference.mla_tree_decode(
        q, kv_cache, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len,
        sm_scale=sm_scale, v_head_dim=out.shape[2],
    )
    out.copy_(o_ref)
    lse.copy_(lse_ref)


@register("kv_write", "reference")
def kv_write(slots, k, v, pool, layer):
    keep = slots >= 0
    dst = slots[keep]
    pool[0, layer].flatten(0, 1)[dst] = k[keep]
    if v is not None:
        pool[1, layer].flatten(0, 1)[dst] = v[keep]


@register("copy_pages", "reference")
def copy_pages(pool, src, dst, num_slots):
    planes = pool.flatten(0, 1).flatten(1, 2)  # [C * num_layers, num_pages * page_size, ...]
    page_size = pool.shape[3]
    slot = torch.arange(page_size, device=pool.device)
    used = slot[None, :] < num_slots[:, None]
    planes[:, (dst[:, None] * page_size + slot)[used]] = planes[:, (src[:, None] * page_size + slot)[used]]
