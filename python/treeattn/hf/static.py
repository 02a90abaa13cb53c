"""Compiled decoding: a :class:`~treeattn.hf.TreeCache` whose decode step runs under ``torch.compile``.

transformers compiles the decode step of ``generate`` (``compile_config=``, ``cache_implementation="static"``)
when the cache says it is compileable: it calls ``model.get_compiled_call(compile_config)`` once and then the
compiled forward every step. A compiled step must not change shape or Python facts between steps, or it
recompiles. :class:`StaticTreeCache` keeps every tensor that the step reads at a fixed size and address:

- the plan is a fixed-capacity :class:`~treeattn.TreePlan` (sized by :func:`decode_capacity` for the rows and
  the longest sequence), refilled in place every step (``TreeKVCache.plan(..., into=)``), its fp32 workspace
  made once;
- the step's slots are copied into one ``[rows]`` buffer;
- ``get_seq_length`` is a 0-d tensor and ``get_mask_sizes`` a fixed size inside the compiled region (a decode
  step needs no mask: the plan is the mask).

:func:`compiled_decoding` (a context manager, used by :func:`treeattn.hf.generate`) routes the model through
such a cache and hands transformers a compiled call whose host part (one append, one plan into the fixed
buffers) runs eagerly before the compiled forward: the compiled region is the model's own forward, where
treeattn's kernels are registered ops (``torch.ops.treeattn.*``) opaque to dynamo. On a GPU, inductor's
``mode="reduce-overhead"`` (transformers' default) replays the step as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

import treeattn
from treeattn import _planner

from .adapter import UnsupportedModel, attached
from .cache import CacheStep, TreeCache, _TreeLayer

_SIZING = _planner.SIZING


def decode_capacity(num_rows: int, max_length: int, page_size: int) -> treeattn.PlanCapacity:
    """A :class:`~treeattn.PlanCapacity` that every decode step of ``num_rows`` rows of at most ``max_length``
    tokens fits, however the rows share their paths.

    A query's path is at most ``P = ceil(max_length / page_size)`` pages, cut by the planner into trie edges
    (at most ``min(num_rows, P)`` on one path: each edge below a branch point has fewer queries) and each edge
    into chunks of at least ``min_chunk_tokens`` tokens: at most ``ceil(P / chunk_pages) + edges`` rows per
    query. Items, partial rows and rows are bounded by the rows; merges by the queries; the table by ``P`` per
    query."""
    pages = -(-max(max_length, 1) // page_size)
    chunk_pages = max(1, _SIZING["min_chunk_tokens"] // page_size)
    per_query = -(-pages // chunk_pages) + min(num_rows, pages)
    rows = max(1, num_rows * per_query)
    return treeattn.PlanCapacity(items=rows, rows=rows, partial_rows=rows, merge_queries=max(1, num_rows),
                                 nnz=max(1, num_rows * pages))


class _StaticLayer(_TreeLayer):
    """A :class:`StaticTreeCache` layer: inside a compiled region its sequence length is the cache's 0-d tensor
    and its mask size fixed (a Python int that changes every step would recompile the step)."""

    is_compileable = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if torch.compiler.is_compiling():
            return self.owner.max_length, 0
        return super().get_mask_sizes(query_length)

    def get_seq_length(self):
        if torch.compiler.is_compiling():
            return self.owner.seen
        return super().get_seq_length()

    def get_max_length(self) -> int:
        return self.owner.max_length


class StaticTreeCache(TreeCache):
    """A :class:`~treeattn.hf.TreeCache` whose decode step compiles once (``is_compileable``): every tensor a
    decode step reads keeps its size and address from step to step.

    Args:
        model: as for :class:`~treeattn.hf.TreeCache`.
        max_length: the longest sequence (prompt and new tokens, padding included) a decode step may hold; sizes
            the plan's capacity (:func:`decode_capacity`).
        **kwargs: as for :class:`~treeattn.hf.TreeCache` (``page_size``, ``num_pages``, ...).

    ``plan`` is the fixed-capacity plan every decode step refills (None before the first), ``seen`` the 0-d
    int64 tensor of positions seen. A step that does not fit the plan (more rows, a longer sequence than
    ``max_length``, which then doubles) re-plans into a new, larger plan: the compiled step then recompiles.
    """

    def __init__(self, model, *, max_length: int, **kwargs):
        super().__init__(model, **kwargs)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected an int >= 1 (the longest sequence), got {max_length!r}")
        self.max_length = max_length
        self.layers = [_StaticLayer(self, i) for i in range(self.spec.num_layers)]
        self.plan: treeattn.TreePlan | None = None
        self._slots: torch.Tensor | None = None
        self.seen = torch.zeros((), dtype=torch.int64, device=self.tree.device)
        _static(self.seen)

    @property
    def is_compileable(self) -> bool:
        return True

    def _decode_step(self, slots: torch.Tensor, take) -> CacheStep:
        if take is not None:  # (a driver's own slot layout: not a compiled step's)
            return super()._decode_step(slots, take)
        self.seen.fill_(self.positions)
        return CacheStep(mode="decode", rows=self.rows, slots=self._fixed_slots(slots), plan=self._refill(),
                         longest_row=max((n.end for n in self.tree.tree.nodes(self.rows, "decode", "rows")), default=0))

    def _fixed_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` in the cache's one ``[rows]`` buffer."""
        if self._slots is None or self._slots.shape != slots.shape:
            self._slots = _static(torch.empty_like(slots))
        return self._slots.copy_(slots)

    def _refill(self) -> treeattn.TreePlan:
        """The step's plan, in the fixed-capacity plan's buffers (a new plan when the step does not fit)."""
        rows, heads = self.rows, self.spec.num_qo_heads
        if self.plan is not None and self.plan.num_queries == len(rows):
            try:
                return self._bounded(self.tree.plan(rows, num_qo_heads=heads, into=self.plan))
            except ValueError:  # does not fit: a larger plan below (the compiled step recompiles)
                pass
        longest = max((self.tree.length(r) for r in rows), default=0)
        if longest > self.max_length:  # outgrown: twice the room, so that the step recompiles O(log) times
            self.max_length = max(longest, 2 * self.max_length)
        capacity = decode_capacity(len(rows), self.max_length, self.page_size)
        plan = self.tree.plan(rows, num_qo_heads=heads, capacity=capacity)
        width = self.spec.kv_lora_rank if self.spec.mla else self.spec.head_dim
        for t in (*plan.tensor_args(), *plan.workspace(heads, width)):  # (made here, not in the compiled region)
            _static(t)
        self.plan = plan
        return self._bounded(plan)

    def _bounded(self, plan: treeattn.TreePlan) -> treeattn.TreePlan:
        """``plan`` with its page bound at the pool's last page: every page id of a plan this tree makes is
        below it, and the decode op's bound check (which the compiled step specialises on) then reads a
        value that does not change from step to step."""
        plan.max_page_id = self.num_pages - 1
        return plan


def _static(t: torch.Tensor) -> torch.Tensor:
    """``t``, marked as keeping its address (CUDA graphs read it in place instead of copying it each replay)."""
    torch._dynamo.mark_static_address(t)
    return t


# ---- transformers' compiled call over a StaticTreeCache ---------------------------------------------------


def compile_requested(config, other_driver: bool = False) -> bool:
    """Whether ``generate`` with generation config ``config`` asks for compiled decoding
    (``cache_implementation="static"`` or a ``compile_config``), which treeattn serves with a
    :class:`StaticTreeCache`. Other cache implementations, and compiled decoding together with a driver of its
    own (``other_driver``: speculative decoding, a prefix cache, a continued cache), raise :class:`UnsupportedModel`."""
    implementation = getattr(config, "cache_implementation", None)
    if implementation not in (None, "static"):
        raise UnsupportedModel(
            f"cache_implementation: expected None or 'static' (treeattn brings its own cache; 'static' is its "
            f"compileable TreeCache), got {implementation!r}"
        )
    compiled = implementation == "static" or getattr(config, "compile_config", None) is not None
    if compiled and other_driver:
        raise UnsupportedModel("compile_config: compiled decoding together with speculative decoding, a prefix "
                               "cache or past_key_values is not supported; pass one of them")
    return compiled


# Compiled forwards by model and compile options: later generate calls reuse the compiled step.
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_forward(model, forward, compile_config):
    """``forward(**kwargs)`` under ``torch.compile`` with ``compile_config``'s options, made once per model and
    options. A bound method of ``model`` is compiled as its function (called with ``model``), so that the table
    of compiled forwards does not keep the model alive."""
    options = compile_config.to_dict()
    key = repr(sorted(options.items(), key=lambda kv: kv[0]))
    per_model = _compiled.setdefault(model, {})
    function = getattr(forward, "__func__", None) if getattr(forward, "__self__", None) is model else None
    if key not in per_model:
        per_model[key] = torch.compile(function or forward, **options)
    compiled = per_model[key]
    return functools.partial(compiled, model) if function is not None else compiled


def _decode_masks(own):
    """``model.create_masks_for_generate`` for a compileable TreeCache: a prompt keeps its 2-D padding mask (the
    routed forward prefills with the model's own attention and mask); a decode step needs none."""

    def create_masks(*args, **kwargs):
        cache = kwargs.get("cache")
        if isinstance(cache, StaticTreeCache):
            return kwargs.get("attention_mask") if cache.expects_prompt else None
        return own(*args, **kwargs)

    return create_masks


@contextlib.contextmanager
def compiled_decoding(model, cache: StaticTreeCache):
    """:func:`~treeattn.hf.adapter.attached` for a :class:`StaticTreeCache`, and transformers' compiled call:
    ``model.get_compiled_call(config)`` returns a call that runs a prompt eagerly (the model's own attention)
    and a decode step as the host step (append, plan into the fixed buffers) followed by the compiled forward."""
    own_forward = model.forward  # the model's forward, before attached routes it through the cache
    saved = {name: model.__dict__[name] for name in ("get_compiled_call", "create_masks_for_generate")
             if name in model.__dict__}
    from transformers.masking_utils import create_masks_for_generate

    own_masks = getattr(model, "create_masks_for_generate", create_masks_for_generate)

    def get_compiled_call(compile_config):
        from transformers import CompileConfig

        compiled = _compiled_forward(model, own_forward, compile_config or CompileConfig())

        def call(**kwargs):
            if kwargs.get("cache") is not cache or cache.expects_prompt:
                return model(**kwargs)  # a prompt (or another cache): the routed, eager forward
            lead = kwargs.get("input_ids")
            if lead is None:
                lead = kwargs.get("inputs_embeds")
            with cache.decode(lead.shape[0], lead.shape[1]), _active(cache):
                return compiled(**kwargs)

        return call

    with attached(model, cache):
        model.get_compiled_call = get_compiled_call
        model.create_masks_for_generate = _decode_masks(own_masks)
        try:
            yield model
        finally:
            for name in ("get_compiled_call", "create_masks_for_generate"):
                model.__dict__.pop(name, None)
            model.__dict__.update(saved)


@contextlib.contextmanager
def _active(cache):
    from .adapter import _ACTIVE

    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
