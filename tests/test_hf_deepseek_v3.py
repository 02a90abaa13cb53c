"""Real client: HF transformers' DeepseekV3Attention (small random-init config, real latent dims, no download,
fp32 on CPU) decoding a tree of branches through treeattn.mla_tree_decode.

For every branch, the oracle is the model's own attention output for the branch's last token when the model
runs on the branch's full sequence (causal). The treeattn path builds the latent cache the way an MLA
serving engine does — the model's ``kv_a_proj_with_mqa``, ``kv_a_layernorm`` and rope (the model's own rope
function, interleaved or not, at each token's position) — stores it once in a paged pool the branches share,
absorbs ``W_UK`` into the query, runs ``treeattn.mla_tree_decode`` with the model's ``scaling`` (YaRN
mscale² included), then applies ``W_UV`` and ``o_proj``.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mdl

import treeattn
from treeattn.testing import relative_error

HIDDEN = 64
HEADS = 4
KV_LORA, ROPE, NOPE, V_DIM = 512, 64, 128, 128

# Branch tree: (parent node, tokens). Node 0 is the shared prompt; 1-3 fork from it; 4-5 fork from 2;
# 6 forks from 5. Lengths are uneven so pages are shared, partially shared and private.
TREE = [(None, 37), (0, 9), (0, 21), (0, 3), (2, 14), (2, 1), (5, 18)]
LEAVES = [1, 3, 4, 6]


def _config(rope_interleave: bool):
    rope = {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
    }
    cfg = transformers.DeepseekV3Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        kv_lora_rank=KV_LORA, q_lora_rank=48, qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=V_DIM,
        max_position_embeddings=1280, rope_parameters=rope, rope_interleave=rope_interleave,
        num_hidden_layers=1, vocab_size=32, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _branch_paths():
    """Token ids (into one flat list of all the tree's tokens) of each leaf's root→leaf sequence."""
    starts, total = [], 0
    for _, n in TREE:
        starts.append(total)
        total += n
    paths = []
    for leaf in LEAVES:
        chain, node = [], leaf
        while node is not None:
            chain.append(node)
            node = TREE[node][0]
        paths.append([t for nd in reversed(chain) for t in range(starts[nd], starts[nd] + TREE[nd][1])])
    return paths, total


def _paged_table(paths, page_size, generator):
    """Copy-on-write page table: a page is shared exactly by the branches whose tokens in it agree; page ids
    are shuffled and a few spare pages are left unused. Returns (table tensors, page of each (leaf, position))."""
    page_of_key: dict[tuple, int] = {}
    rows = []
    for path in paths:
        pages = []
        for s in range(0, len(path), page_size):
            key = (s, tuple(path[s : s + page_size]))
            pages.append(page_of_key.setdefault(key, len(page_of_key)))
        rows.append(pages)
    num_pages = len(page_of_key) + 3
    perm = torch.randperm(num_pages, generator=generator)
    rows = [[int(perm[p]) for p in r] for r in rows]
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).to(torch.int32)
    indices = torch.tensor([p for r in rows for p in r], dtype=torch.int32)
    last = torch.tensor([(len(p) - 1) % page_size + 1 for p in paths], dtype=torch.int32)
    return indptr, indices, last, rows, num_pages


def _apply_rope(cfg, q, k, cos, sin):
    if cfg.rope_interleave:
        return mdl.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    return mdl.apply_rotary_pos_emb(q, k, cos, sin)


def _q_states(attn, h):
    if attn.q_lora_rank is None:
        return attn.q_proj(h)
    return attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(h)))


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("rope_interleave", [True, False])
@torch.no_grad()
def test_deepseek_v3_attention_tree_matches_model(page_size, rope_interleave):
    torch.manual_seed(1234 + page_size + 2 * rope_interleave)
    g = torch.Generator().manual_seed(99 + page_size)
    cfg = _config(rope_interleave)
    attn = mdl.DeepseekV3Attention(cfg, layer_idx=0).eval()
    for norm in (attn.kv_a_layernorm, attn.q_a_layernorm):
        norm.weight.normal_(1.0, 0.2)
    rotary = mdl.DeepseekV3RotaryEmbedding(cfg)

    paths, total_tokens = _branch_paths()
    hidden = torch.randn(total_tokens, HIDDEN)  # one hidden state per tree token

    # Oracle: the model on each branch's full sequence, causal; its last token's attention output.
    oracle = []
    for path in paths:
        length = len(path)
        pos = torch.arange(length)[None]
        cos, sin = rotary(hidden[None, :1], pos)
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        out, _ = attn(hidden_states=hidden[path][None], position_embeddings=(cos, sin), attention_mask=mask)
        oracle.append(out[0, -1])
    oracle = torch.stack(oracle)

    # treeattn: latent cache written once per page into a shared, paged pool.
    indptr, indices, last, rows, num_pages = _paged_table(paths, page_size, g)
    kv_cache = torch.full((num_pages, page_size, KV_LORA + ROPE), float("nan"))
    for path, pages in zip(paths, rows):
        length = len(path)
        cos, sin = rotary(hidden[None, :1], torch.arange(length)[None])
        compressed = attn.kv_a_proj_with_mqa(hidden[path])
        c_kv, k_rot = torch.split(compressed, [KV_LORA, ROPE], dim=-1)
        c_kv = attn.kv_a_layernorm(c_kv)
        _, k_rot = _apply_rope(cfg, k_rot.new_zeros(1, 1, length, ROPE), k_rot.view(1, 1, length, ROPE), cos, sin)
        latent = torch.cat([c_kv, k_rot[0, 0]], dim=-1)
        slots = (torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:length]
        kv_cache.view(-1, KV_LORA + ROPE)[slots] = latent  # shared pages get identical rows again

    # Queries: each branch's last token, rope at its position, W_UK absorbed.
    w_kv_b = attn.kv_b_proj.weight.view(HEADS, NOPE + V_DIM, KV_LORA)
    w_uk, w_uv = w_kv_b[:, :NOPE], w_kv_b[:, NOPE:]
    qs = []
    for path in paths:
        pos = len(path) - 1
        cos, sin = rotary(hidden[None, :1], torch.tensor([[pos]]))
        q = _q_states(attn, hidden[path[-1]][None]).view(1, 1, HEADS, NOPE + ROPE).transpose(1, 2)
        q_nope, q_rot = torch.split(q, [NOPE, ROPE], dim=-1)
        q_rot, _ = _apply_rope(cfg, q_rot, q_rot.new_zeros(1, 1, 1, ROPE), cos, sin)
        q_latent = torch.einsum("hd,hdc->hc", q_nope[0, :, 0], w_uk)
        qs.append(torch.cat([q_latent, q_rot[0, :, 0]], dim=-1))
    q = torch.stack(qs)  # [branches, HEADS, 576]

    plan = treeattn.plan(indptr, indices, last, page_size=page_size, num_qo_heads=HEADS, num_kv_heads=1)
    assert plan.stats["unique_tokens"] < plan.stats["naive_tokens"]  # the branches do share the prompt
    o_latent = treeattn.mla_tree_decode(q, kv_cache, plan, sm_scale=attn.scaling, v_head_dim=KV_LORA)
    v = torch.einsum("nhc,hdc->nhd", o_latent, w_uv)
    out = attn.o_proj(v.reshape(len(paths), HEADS * V_DIM))

    assert torch.isfinite(out).all()
    err = relative_error(out, oracle)
    assert err < 1e-4, f"rel err {err:.3e} vs DeepseekV3Attention"
