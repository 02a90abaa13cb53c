"""Tiny random-init HF models (no download) for tests, examples and benchmarks of treeattn.hf."""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "qwen2", "deepseek_v3")


def tiny_config(family: str = "llama", *, layers: int = 2, vocab: int = 128, hidden: int = 64, heads: int = 4,
                **overrides):
    """A small config of ``family`` (``"llama"``, ``"qwen2"`` or ``"deepseek_v3"``): ``heads`` query heads of
    ``hidden // heads`` (``heads // 2`` KV heads for the GQA families; DeepSeek-V3: latent rank 32 + rope 16,
    YaRN rope so the softmax scale carries mscale²)."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=4096, initializer_range=0.2,
                  tie_word_embeddings=False)
    if family == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, num_key_value_heads=max(1, heads // 2))
    elif family == "deepseek_v3":
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
        config = transformers.DeepseekV3Config(
            **common, num_key_value_heads=heads, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
            qk_nope_head_dim=16, v_head_dim=16, rope_parameters=rope, moe_intermediate_size=32,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1,
        )
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str = "llama", *, seed: int = 0, dtype=torch.float32, device="cpu", **config_overrides):
    """A random-init causal LM from :func:`tiny_config`, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, **config_overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms, so a wrong scale or a missing norm shows up
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return model.to(device=device, dtype=dtype).eval()


def cache_bytes(cache) -> int:
    """KV bytes a cache holds: a transformers cache's key and value tensors (every row, padding included), or a
    :class:`~treeattn.hf.TreeCache`'s pages in use."""
    stats = getattr(cache, "stats", None)
    if stats is not None:
        return stats()["bytes_used"]
    tensors = (t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_report(tree_cache, default_cache=None) -> str:
    """One line: what the TreeCache stores against one cache per sequence (and against ``default_cache``,
    e.g. the cache ``model.generate`` returned)."""
    s = tree_cache.stats()
    line = (
        f"KV: {s['tokens_stored']} tokens stored for {s['leaves']} sequences of {s['tokens_if_unshared']} tokens "
        f"in all; {s['pages_used']} pages ({s['bytes_used'] / 1024:.1f} KiB) vs {s['pages_if_unshared']} pages one "
        f"cache per sequence: {100 * s['memory_saved']:.0f}% saved"
    )
    if default_cache is not None:
        default = cache_bytes(default_cache)
        line += f"; model.generate's cache: {default / 1024:.1f} KiB ({default / max(s['bytes_used'], 1):.1f}x)"
    return line


@torch.no_grad()
def teacher_forced_logprobs(model, tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The model's own log-probability of the last ``count`` of ``tokens`` (1-D), from one forward over the
    whole sequence (its default cache and attention, no treeattn): the oracle for ``TreeSearch.logprobs``."""
    device = next(model.parameters()).device
    logits = model(tokens[None].to(device)).logits[0].float()
    logprobs = torch.log_softmax(logits[-count - 1:-1], dim=-1)
    return logprobs.gather(1, tokens[-count:, None].to(device))[:, 0].cpu()
