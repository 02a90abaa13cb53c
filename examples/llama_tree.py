"""Shared by the examples: a small random-init HF Llama whose attention runs through treeattn.

``TreeLlama`` runs the model's own modules (embeddings, RMSNorms, q/k/v/o projections, rotary embedding,
MLPs, LM head) but replaces attention: each step writes the new tokens' K and V into a
``treeattn.TreeKVCache`` (one launch per layer) and attends with ``treeattn.tree_decode`` over
``cache.plan(nodes)``, so every branch reads the KV its branches share once. ``full_logits`` is the oracle:
the unmodified HF model on a branch's whole sequence.

Without a GPU the Triton kernels run under the Triton CPU interpreter (set before triton is imported).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import treeattn  # noqa: E402

try:
    import transformers
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
except ImportError as err:  # pragma: no cover
    raise SystemExit(f"these examples need HF transformers (pip install transformers): {err}")


def make_model(seed: int = 0, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 96, device="cpu") -> "transformers.LlamaForCausalLM":
    """A tiny random-init Llama (no download), fp32, eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.float32).eval()


class TreeLlama:
    """The model's decoder with treeattn attention over a TreeKVCache.

    ``step(tokens, nodes, num_tokens)``: ``tokens`` ``[len(nodes) * num_tokens]`` are appended to ``nodes``
    (node-major) and run through the model; returns their logits ``[len(nodes) * num_tokens, vocab]``.
    Token ``j`` of a node attends its root→node path up to and including itself.
    """

    def __init__(self, model, *, page_size: int = 8, num_pages: int = 256):
        self.model = model
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = next(model.parameters()).device
        self.cache = treeattn.TreeKVCache(
            cfg.num_hidden_layers, self.kv_heads, self.head_dim, page_size=page_size, num_pages=num_pages,
            dtype=torch.float32, device=self.device,
        )

    @torch.no_grad()
    def step(self, tokens, nodes, num_tokens: int = 1) -> torch.Tensor:
        cache = self.cache
        slots = cache.append(nodes, num_tokens)
        plan = cache.plan(nodes, num_tokens, num_qo_heads=self.heads)
        ends = torch.tensor([cache.length(n) for n in nodes], device=self.device)
        positions = (ends[:, None] - num_tokens + torch.arange(num_tokens, device=self.device)).reshape(-1)
        ids = torch.as_tensor(tokens, device=self.device).reshape(-1)
        n = ids.shape[0]
        m = self.model.model
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h[None], positions[None])
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
            cache.write(i, slots, k, v)  # one launch: every branch's new K and V
            o = treeattn.tree_decode(q, *cache.layer(i), plan, sm_scale=attn.scaling)
            h = h + attn.o_proj(o.reshape(n, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h))


@torch.no_grad()
def full_logits(model, sequence) -> torch.Tensor:
    """The oracle: the HF model (eager attention, no cache) on one whole sequence: logits ``[len, vocab]``."""
    ids = torch.as_tensor(sequence, device=next(model.parameters()).device)[None]
    return model(input_ids=ids).logits[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def memory_report(stats: dict) -> str:
    kib = 1024
    return (
        f"KV pool: {stats['pages_used']} pages ({stats['bytes_used'] / kib:.1f} KiB) for {stats['leaves']} branches; "
        f"per-branch caches would hold {stats['pages_if_unshared']} pages ({stats['bytes_if_unshared'] / kib:.1f} KiB): "
        f"{100 * stats['memory_saved']:.0f}% saved ({stats['tokens_stored']} tokens stored vs "
        f"{stats['tokens_if_unshared']}; {stats['pages_copied']} pages copied on write)"
    )
