"""The model adapter: what treeattn needs to know about a HF model, and how its attention is routed through treeattn.

- :func:`inspect_model` reads the decoder's KV shape (GQA heads, or DeepSeek-V3's latent rows) and rejects the
  families treeattn cannot serve exactly, naming what is unsupported.
- ``"treeattn"`` is registered with transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``): a
  decode step runs ``treeattn.tree_decode`` (``treeattn.mla_tree_decode`` for MLA) over the plan the running
  :class:`~treeattn.hf.TreeCache` made for the step; a prompt runs the model's own attention implementation
  (the one it had before), with the model's own mask, so the prefill is exactly the model's.
- :func:`attached` switches a model to ``"treeattn"`` for the duration of a ``with`` block and routes its
  ``forward`` through the cache: the cache opens each step (one append and one plan for every layer), and a
  prefill runs each distinct prompt row once, however many times it appears in the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPLEMENTATION = "treeattn"

# The TreeCache of the forward pass that is running (set by the forward wrapper of `attached`). transformers
# hands an attention function the module and the tensors, not the cache, so the attention reads it from here.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("treeattn_hf_active_cache", default=None)

_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


class UnsupportedModel(ValueError):
    """The model (or a generation option) needs something treeattn.hf does not do; the message names it."""


@dataclass(frozen=True)
class ModelSpec:
    """The decoder's KV layout: GQA (``num_kv_heads`` x ``head_dim`` per token) or MLA latent rows
    (``kv_lora_rank + rope_dim`` per token, one per layer). Head counts are this rank's under tensor parallelism."""

    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    mla: bool
    kv_lora_rank: int = 0
    rope_dim: int = 0
    model_type: str = ""


def _attention_modules(model) -> list:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


# transformers' parallel layouts other than tensor parallelism (DistributedConfig sizes); expert parallelism
# shards MoE experts only, so the attention (and its KV) is what tensor parallelism makes it.
_UNSUPPORTED_PARALLELISM = {
    "pp_size": "pipeline parallelism",
    "fsdp_size": "fully sharded data parallelism (FSDP)",
    "dp_replicate_size": "replicated data parallelism",
}


def _check_parallel_layout(config) -> None:
    layout = getattr(config, "distributed_config", None)
    for name, what in _UNSUPPORTED_PARALLELISM.items():
        size = getattr(layout, name, None) or 1
        if size > 1:
            raise UnsupportedModel(
                f"distributed_config: expected tensor parallelism only (tp_size; ep_size for MoE experts), got {what} "
                f"({name}={size}), which treeattn.hf does not support"
            )


def _local_heads(attention, projection: str, heads: int, kind: str) -> int:
    """How many of ``heads`` this rank holds. Tensor parallelism (transformers' colwise style) makes the
    projection's weight a DTensor whose local rows are this rank's heads; without it the rank holds them all."""
    linear = getattr(attention, projection, None)
    weight = getattr(linear, "weight", None)
    if weight is None:
        if any(hasattr(p, "to_local") for p in attention.parameters()):
            raise UnsupportedModel(
                f"model: {kind}'s attention is sharded by tensor parallelism but has no {projection} to read the "
                "rank's heads from; treeattn.hf reads them from q_proj/k_proj (kv_b_proj for MLA)"
            )
        return heads
    if not hasattr(weight, "to_local"):
        return heads
    local, full = weight.to_local().shape[0], weight.shape[0]
    if heads * local % full:
        raise UnsupportedModel(
            f"model: expected a tensor-parallel size that divides {kind}'s {heads} heads of {projection}, got "
            f"{local} of its {full} rows on this rank"
        )
    return heads * local // full


def unwrap_compiled(model):
    """The module under ``torch.compile``'s wrapper (``torch.compile(model)`` is an ``OptimizedModule`` whose
    ``generate`` is the wrapped model's): treeattn.hf drives the wrapped model itself, as ``generate`` does."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def inspect_model(model) -> ModelSpec:
    """The model's :class:`ModelSpec`; raises :class:`UnsupportedModel` naming what treeattn cannot serve."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise UnsupportedModel(
            f"model: expected a transformers model with a config and generate(), got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"model: {config.model_type} is an encoder-decoder model; treeattn.hf serves decoder-only models "
            "(cross-attention is not supported)"
        )
    text = config.get_text_config(decoder=True)
    kind = getattr(text, "model_type", type(model).__name__)
    if getattr(text, "cross_attention_layers", None) or getattr(text, "add_cross_attention", False):
        raise UnsupportedModel(f"model: {kind} has cross-attention layers, which treeattn.hf does not support")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise UnsupportedModel(
            f"model: {kind}'s attention does not go through transformers' AttentionInterface, so it cannot run "
            "as the 'treeattn' attention implementation"
        )
    num_layers = text.num_hidden_layers
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * num_layers)
    unsupported = sorted(set(layer_types) - _SUPPORTED_LAYER_TYPES)
    if unsupported:
        raise UnsupportedModel(
            f"model: {kind} has layers of type {unsupported}; treeattn.hf supports {sorted(_SUPPORTED_LAYER_TYPES)} "
            "(sliding windows only while every sequence fits in the window)"
        )
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModel(f"model: {kind} uses attention logit soft-capping, which treeattn does not support")
    if getattr(text, "kv_sharing_modes", None) or getattr(text, "num_kv_shared_layers", 0):
        raise UnsupportedModel(f"model: {kind} shares KV between layers, which treeattn.hf does not support")

    _check_parallel_layout(config)

    # Head counts are this rank's under tensor parallelism (the latent row of MLA is replicated, one per token).
    heads = text.num_attention_heads
    attn = _attention_modules(model)
    if getattr(text, "kv_lora_rank", None):
        if not attn or not all(hasattr(m, "expand_kv") and hasattr(m, "kv_b_proj") for m in attn):
            raise UnsupportedModel(
                f"model: {kind} has multi-head latent attention that does not cache the latent rows "
                "(DeepSeek-V3's layout: kv_a_layernorm(c_kv) and roped k_pe); treeattn.hf's MLA path needs that layout"
            )
        rank, rope = text.kv_lora_rank, text.qk_rope_head_dim
        return ModelSpec(num_layers, _local_heads(attn[0], "kv_b_proj", heads, kind), 1, rank + rope, True, rank, rope,
                         kind)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if attn:
        heads, kv_heads = _local_heads(attn[0], "q_proj", heads, kind), _local_heads(attn[0], "k_proj", kv_heads, kind)
    return ModelSpec(num_layers, heads, kv_heads, head_dim, False, model_type=kind)


# ---- the registered attention ---------------------------------------------------------------------------


def _own_attention(implementation: str, module):
    """The attention function the model used before it was switched to treeattn (its eager one is defined in
    the module's own modeling file)."""
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModel(
            f"model: cannot find the eager attention of {type(module).__name__} to run the prompt with; "
            "load the model with attn_implementation='sdpa'"
        )
    return eager


def treeattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (``AttentionInterface`` entry ``"treeattn"``).

    Decode (one new token per row): ``query [rows, heads, 1, head_dim]`` attends each row's path in the running
    :class:`~treeattn.hf.TreeCache` through the step's plan; returns ``([rows, 1, heads, v_dim], None)``.
    Prefill: the model's own attention implementation on ``query``, ``key``, ``value`` and its mask.
    """
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(
            "the 'treeattn' attention implementation runs inside treeattn.hf.generate or treeattn.hf.TreeSearch "
            "(it reads the TreeCache of the running step)"
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise UnsupportedModel(f"{name}: attention with {name} is not supported by treeattn.hf")
    step = cache.step
    window = kwargs.get("sliding_window")
    if window is not None and step.longest_row > window:
        raise UnsupportedModel(
            f"sliding_window: expected every sequence within the model's attention window ({window} tokens), got one "
            f"of {step.longest_row} tokens; treeattn does not implement sliding-window attention"
        )
    if dropout and module.training:
        raise UnsupportedModel("dropout: attention dropout (model.train()) is not supported; call model.eval()")
    if step.mode == "prefill":
        own = _own_attention(step.prompt_attention, module)
        return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if step.mode != "decode" or query.shape[2] != 1:
        raise RuntimeError(
            f"treeattn attention: expected one new token per row in a decode step, got query {list(query.shape)}")
    layer = module.layer_idx
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    tree = cache.tree
    q = query.select(2, 0)  # [rows, heads, head_dim] (select: the cheapest view op for it)
    if q.dtype != tree.dtype or q.device != tree.device:
        q = q.to(device=tree.device, dtype=tree.dtype)  # (a pool of another dtype)
    if cache.spec.mla:
        out = _mla_decode(module, q, cache, layer, scaling)
    else:
        out = cache.decoder(q.contiguous(), **cache.decode_kwargs(layer), sm_scale=scaling)
    if out.dtype != query.dtype or out.device != query.device:
        out = out.to(device=query.device, dtype=query.dtype)
    return out.unsqueeze(1), None  # [rows, 1, heads, v_dim]


def _mla_decode(module, q, cache, layer: int, scaling: float) -> torch.Tensor:
    """DeepSeek-V3 decode in the absorbed form: ``W_UK`` folded into the query, attention over the latent rows
    (``c_kv ‖ k_pe``), ``W_UV`` applied to the latent output. ``q [rows, heads, qk_nope + qk_rope]`` ->
    ``[rows, heads, v_head_dim]``."""
    nope, rank = module.qk_nope_head_dim, module.kv_lora_rank
    w_kv_b = module.kv_b_proj.weight
    if hasattr(w_kv_b, "to_local"):
        w_kv_b = w_kv_b.to_local()  # tensor parallelism: the rows of this rank's heads
    w_kv_b = w_kv_b.view(-1, nope + module.v_head_dim, rank).to(q.device, q.dtype)
    w_uk, w_uv = w_kv_b[:, :nope], w_kv_b[:, nope:]
    q_latent = torch.einsum("nhd,hdc->nhc", q[..., :nope], w_uk)
    q_absorbed = torch.cat([q_latent, q[..., nope:]], dim=-1).contiguous()
    o_latent = cache.decoder(q_absorbed, **cache.layer_kv(layer), sm_scale=scaling, v_head_dim=rank)
    return torch.einsum("nhc,hdc->nhd", o_latent, w_uv)


def treeattn_mask(*args, **kwargs):
    """transformers mask function (``AttentionMaskInterface`` entry ``"treeattn"``): a prefill gets the mask of
    the model's own implementation; a decode step needs none (the plan is the mask)."""
    cache = _ACTIVE.get()
    if cache is None or cache.step.mode != "prefill":
        return None
    own = cache.step.prompt_attention
    if own not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None  # (what transformers does for an implementation without a mask function)
    return ALL_MASK_ATTENTION_FUNCTIONS[own](*args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, treeattn_attention)
AttentionMaskInterface.register(IMPLEMENTATION, treeattn_mask)


# ---- routing a model through a TreeCache -----------------------------------------------------------------


def _rows_of(tree, index: torch.Tensor, num_rows: int):
    """``tree`` (a tensor, tuple or ModelOutput) with every tensor of ``num_rows`` rows re-indexed by ``index``."""
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, index.to(tree.device)) if tree.dim() and tree.shape[0] == num_rows else tree
    if isinstance(tree, tuple):
        return type(tree)(_rows_of(t, index, num_rows) for t in tree)
    return tree


def _distinct_rows(tensors: list[torch.Tensor], num_rows: int) -> tuple[list[int], list[int]]:
    """(first row of each distinct row, the distinct row each row is), comparing rows of every tensor bytewise."""
    flat = [t.detach().reshape(num_rows, -1).contiguous().cpu() for t in tensors]
    first: dict[tuple, int] = {}
    distinct, inverse = [], []
    for r in range(num_rows):
        key = tuple(bytes(f[r].view(torch.uint8).numpy()) for f in flat)
        u = first.setdefault(key, len(distinct))
        if u == len(distinct):
            distinct.append(r)
        inverse.append(u)
    return distinct, inverse


def _prefill(forward, cache, kwargs: dict, attention: str):
    lead = kwargs.get("input_ids")
    if lead is None:
        lead = kwargs.get("inputs_embeds")
    num_rows, length = lead.shape[0], lead.shape[1]
    per_row = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == num_rows]
    rows = [kwargs[k] for k in per_row] + cache.row_context(num_rows)  # (rows continuing other prefixes differ)
    distinct, inverse = _distinct_rows(rows, num_rows)
    if len(distinct) < num_rows:
        index = torch.tensor(distinct, device=lead.device)
        kwargs = {k: (v.index_select(0, index.to(v.device)) if k in per_row else v) for k, v in kwargs.items()}
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise UnsupportedModel(
            "attention_mask: expected a 2-D [batch, length] padding mask (or None), got a custom mask")
    with cache.prefill(len(distinct), length, mask, row_of=inverse, attention=attention):
        out = forward(**kwargs)
    if len(distinct) < num_rows:
        index = torch.tensor(inverse)
        if isinstance(out, tuple):
            out = _rows_of(out, index, len(distinct))
        else:
            for k in list(out.keys()):
                if k != "cache" and k != "past_key_values":
                    out[k] = _rows_of(out[k], index, len(distinct))
    return out


def _routed_forward(forward, cache, prompt_attention: str):
    signature = None

    @functools.wraps(forward)
    def routed(*args, **kwargs):
        nonlocal signature
        if args:
            signature = signature or inspect.signature(forward)
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
        step_cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if step_cache is not cache:
            return forward(**kwargs)
        if kwargs.get("output_attentions"):
            raise UnsupportedModel("output_attentions: attention weights are not computed by treeattn's decode")
        token = _ACTIVE.set(cache)
        try:
            if cache.expects_prompt:
                return _prefill(forward, cache, kwargs, prompt_attention)
            lead = kwargs.get("input_ids")
            if lead is None:
                lead = kwargs.get("inputs_embeds")
            with cache.decode(lead.shape[0], lead.shape[1]):
                return forward(**kwargs)
        finally:
            _ACTIVE.reset(token)

    return routed


@contextlib.contextmanager
def attached(model, cache):
    """Within the block, ``model`` runs its attention through treeattn when its forward gets ``cache=cache``;
    afterwards the model is as it was (attention implementation and ``forward``)."""
    own = model.config._attn_implementation
    if own == IMPLEMENTATION:
        raise UnsupportedModel("model: its attention implementation is already 'treeattn' (nested use of one model)")
    had_forward = "forward" in model.__dict__
    saved_forward = model.__dict__.get("forward")
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        model.forward = _routed_forward(model.forward, cache, own)
        yield model
    finally:
        if had_forward:
            model.forward = saved_forward
        else:
            model.__dict__.pop("forward", None)
        model.set_attn_implementation(own)
