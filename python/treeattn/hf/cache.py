"""TreeCache: a ``transformers.Cache`` whose batch rows are leaves of a ``treeattn.TreeKVCache``.

Every row of the batch is a leaf node; its KV is the root→leaf path, so rows that share a prefix (the samples
or beams of one prompt) store it once and read it once per step. HF's cache operations are tree operations:

- ``batch_repeat_interleave(n)``: each row forks into ``n`` rows (no copy);
- ``reorder_cache(beam_idx)``: a row chosen once goes on as it is, a row chosen ``c > 1`` times forks into ``c``
  rows, a row not chosen is released (its pages return to the pool unless a chosen row still needs them);
- ``batch_select_indices(indices)``: the same with the rows kept; ``crop(-k)``: every row without its last ``k``
  tokens.

The cache owns its step state machine. A forward pass through the cache is one step, opened and closed by
the cache's own methods (the model adapter calls them; nothing else changes the cache's state):

- :meth:`TreeCache.prefill` (a context manager): a prompt batch, one root per distinct prompt row holding its
  real tokens; on a clean exit every batch row becomes a leaf forked from its prompt's root, on an exception
  the roots are released and the cache is as it was;
- :meth:`TreeCache.decode` (a context manager): one new token per row, one append and one plan for every layer.

:attr:`TreeCache.step` is the running step, a read-only :class:`CacheStep` (what the attention function
reads). A driver that chooses each step's batch itself (:class:`~treeattn.hf.TreeSearch`) uses
:meth:`TreeCache.expect_prompt` and :meth:`TreeCache.set_rows`. Padding is not stored: a left-padded prompt
holds only its real tokens, which is what the model's padding mask lets a query see.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import treeattn
from treeattn.cache import StepWriter
from treeattn.decode import MLAStepDecoder, StepDecoder, mla_tree_decoder, tree_decoder

from .adapter import ModelSpec, UnsupportedModel, inspect_model, unwrap_compiled

DEFAULT_TOKENS = 16384  # pool size (in tokens) when num_pages is not given


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """The step a :class:`TreeCache` is running: what its attention and mask functions read.

    Attributes:
        mode: ``"idle"`` (no forward pass through the cache), ``"prefill"`` (a prompt batch) or ``"decode"``
            (one new token per row).
        rows: the ``TreeKVCache`` node each batch row writes (prefill: the root of each distinct prompt row;
            decode: the row's leaf).
        slots: int64 flat slots the step writes, row-major (prefill: only the real tokens).
        take: prefill: ``[real tokens]`` indices into the flat ``[rows * length]`` tokens of the batch that are
            stored (padding is not); decode: None, or the row written to each slot (see ``set_rows``).
        plan: decode: the ``TreePlan`` every layer reads; None otherwise.
        longest_row: tokens on the longest row's path once the step's tokens are written.
        prompt_attention: prefill: the model's own attention implementation (``"sdpa"``, ``"eager"``, ...), which
            runs the prompt with the model's own mask.
    """

    mode: str = "idle"
    rows: tuple[int, ...] = ()
    slots: torch.Tensor | None = None
    take: torch.Tensor | None = None
    plan: treeattn.TreePlan | None = None
    longest_row: int = 0
    prompt_attention: str = "sdpa"
    past: tuple[int, ...] = ()  # prefill over cached prefixes: each row's stored tokens before the step's


_IDLE = CacheStep()


class _TreeLayer(CacheLayerMixin):
    """One layer's view of a :class:`TreeCache` (transformers walks ``cache.layers`` for per-layer facts).

    ``keys`` / ``values`` are what a ``transformers.DynamicLayer`` would hold, materialized (a copy, made on
    each read) from the shared pages: ``[rows, kv_heads, positions, head_dim]`` for GQA; for DeepSeek-V3 the
    tensors its attention passes to ``update``, ``[rows, 1, positions, kv_lora_rank]`` (``c_kv``) and
    ``[rows, 1, positions, rope_dim]`` (roped ``k_pe``). Positions a row does not store (left padding) are 0.
    They are read-only: change the cache through its methods.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: TreeCache, index: int):
        # (CacheLayerMixin.__init__ would assign keys/values, which are read-only here)
        self.owner, self.index = owner, index
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self.owner.dense_kv(self.index)[0]

    @property
    def values(self) -> torch.Tensor:
        return self.owner.dense_kv(self.index)[1]

    @keys.setter
    def keys(self, value) -> None:
        raise AttributeError("keys: a TreeCache layer's keys are read-only (materialized from the shared pages)")

    @values.setter
    def values(self, value) -> None:
        raise AttributeError("values: a TreeCache layer's values are read-only (materialized from the shared pages)")

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.positions + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.positions

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        return None

    def offload(self):
        return None

    def prefetch(self):
        return None


class TreeCache(Cache):
    """A ``transformers.Cache`` over a ``treeattn.TreeKVCache``: each batch row is a leaf of the tree.

    Args:
        model: the HF causal LM it serves (its KV layout and dtype/device are read from it).
        page_size: tokens per page.
        num_pages: pool size (default: room for 16384 tokens).
        device, dtype: of the pool (default: the model's).
        sized_by: the call whose ``num_pages`` an ``OutOfPages`` message tells to raise.
        tree: a ``treeattn.TreeKVCache`` to serve from instead of a new pool (``page_size``, ``num_pages``,
            ``device`` and ``dtype`` are then its own).

    ``stats()`` reports what the tree stores (``tokens_stored``) against one cache per row
    (``tokens_if_unshared``), see ``treeattn.TreeKVCache.stats``. ``tree`` is the ``TreeKVCache``, ``rows``
    the leaf node of each batch row, ``positions`` the positions each row has seen (padding included: what
    transformers calls the sequence length), ``step`` the running :class:`CacheStep`. Used through
    :func:`treeattn.hf.generate` (which sizes the pool) and :class:`treeattn.hf.TreeSearch`.
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None, device=None, dtype=None,
                 sized_by: str = "TreeCache(...)", prefixes=None, tree=None):
        model = unwrap_compiled(model)
        self.spec: ModelSpec = inspect_model(model)
        spec = self.spec
        # A prefix cache (treeattn.prefix_cache.PrefixKVCache) lends its TreeKVCache and evicts cached
        # sequences when a step runs out of pages.
        self.prefixes = prefixes
        self._past: tuple = ()  # rows to continue from in the next prompt step (cached prefixes), see continue_from
        self.on_prompt = None  # called with the prompt rows' nodes after a prompt step (to cache the prompts)
        if num_pages is None:
            num_pages = -(-DEFAULT_TOKENS // page_size) if isinstance(page_size, int) and page_size > 0 else 1
        parameter = next(model.parameters())
        device = parameter.device if device is None else torch.device(device)
        dtype = parameter.dtype if dtype is None else dtype
        if prefixes is not None:
            self.tree = prefixes.cache
        elif tree is not None:  # another TreeCache's pool (a continuation of its rows), see treeattn.hf.continuation
            self.tree = tree
        elif spec.mla:
            self.tree = treeattn.TreeKVCache.mla(
                spec.num_layers, kv_lora_rank=spec.kv_lora_rank, rope_dim=spec.rope_dim, page_size=page_size,
                num_pages=num_pages, dtype=dtype, device=device,
            )
        else:
            self.tree = treeattn.TreeKVCache(
                spec.num_layers, spec.num_kv_heads, spec.head_dim, page_size=page_size, num_pages=num_pages,
                dtype=dtype, device=device,
            )
        super().__init__(layers=[_TreeLayer(self, i) for i in range(spec.num_layers)])
        # The pool never moves: each layer's views (and their keyword form) are made once, not per call.
        self._layer_kv = tuple(self.tree.layer(i) for i in range(spec.num_layers))
        self._decode_kwargs = tuple(dict(layer) for layer in self._layer_kv)
        self.sized_by = sized_by
        self._rows: tuple[int, ...] = ()
        self._positions = 0
        self._expects_prompt = True
        self._step = _IDLE
        self._grown_slots: torch.Tensor | None = None  # set_rows(..., slots=): the next decode step's slots
        self._writer: StepWriter | None = None  # the running decode step's writes
        self._decoder: StepDecoder | MLAStepDecoder | None = None  # the running decode step's attention calls
        self._counts = {"forward_passes": 0, "draft_tokens": 0, "accepted_draft_tokens": 0,
                        "draft_forward_passes": 0}

    # ---- facts transformers asks for ----

    @property
    def page_size(self) -> int:
        return self.tree.page_size

    @property
    def num_pages(self) -> int:
        return self.tree.num_pages

    @property
    def rows(self) -> tuple[int, ...]:
        """The ``TreeKVCache`` leaf of each batch row."""
        return self._rows

    @property
    def positions(self) -> int:
        """Positions each row has seen, padding included (what transformers calls the sequence length)."""
        return self._positions

    @property
    def step(self) -> CacheStep:
        """The running step (``mode == "idle"`` between forward passes)."""
        return self._step

    @property
    def expects_prompt(self) -> bool:
        """True when the next forward pass through the cache is a prompt batch (a prefill)."""
        return self._expects_prompt

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def is_compileable(self) -> bool:
        return False

    def stats(self) -> dict:
        """``TreeKVCache.stats()`` of the tree (``tokens_stored`` vs ``tokens_if_unshared``, pages and bytes), and
        ``forward_passes`` (forward passes through the cache, prefill included: plain decoding of T tokens is
        T), ``draft_tokens``, ``accepted_draft_tokens`` and ``draft_forward_passes`` (speculative decoding, see
        :meth:`count_draft`)."""
        return {**self.tree.stats(), **self._counts}

    def count_draft(self, draft_tokens: int, accepted_draft_tokens: int, draft_forward_passes: int = 0) -> None:
        """Record verified draft trees in :meth:`stats` (and the draft model's forwards that made them)."""
        self._counts["draft_tokens"] += draft_tokens
        self._counts["accepted_draft_tokens"] += accepted_draft_tokens
        self._counts["draft_forward_passes"] += draft_forward_passes

    def __repr__(self) -> str:
        return f"TreeCache(rows={len(self._rows)}, positions={self._positions}, {self.tree!r})"

    # ---- pool ----

    def out_of_pages(self, err: treeattn.OutOfPages) -> treeattn.OutOfPages:
        """``err`` with a message that says which ``num_pages`` to pass to :attr:`sized_by`."""
        hint = treeattn.OutOfPages(err.pages_needed, err.pages_free)
        more = self.num_pages + err.pages_needed - err.pages_free
        hint.args = (
            f"{err.args[0]}; the TreeCache pool has num_pages={self.num_pages} (page_size={self.page_size}): pass "
            f"num_pages={max(more, 2 * self.num_pages)} or more to {self.sized_by}",
        )
        return hint

    def _pages(self, call):
        """``call()`` (a tree operation taking pages), evicting cached prefixes first when it runs short."""
        return call() if self.prefixes is None else self.prefixes.reserve(call)

    def continue_from(self, leaves, positions: int) -> None:
        """The next prompt step continues cached prefixes: batch row ``i`` appends to live leaf ``leaves[i]``
        (None: a new root), whose path holds the row's first stored tokens; ``positions`` (padding included) is
        the prompt length already seen. Rows with the same leaf must be the same prompt row."""
        self._check_idle("continue_from")
        self._past = tuple(leaves)
        self._positions = positions
        self._expects_prompt = True

    def row_context(self, num_rows: int) -> list[torch.Tensor]:
        """What tells prompt rows apart besides their inputs: the cached prefix each continues (none usually)."""
        if not self._past:
            return []
        return [torch.tensor([-1 if leaf is None else leaf for leaf in self._past])]

    def reserve(self, pages_needed: int, what: str) -> None:
        """Raise ``OutOfPages`` (with the ``num_pages`` hint) unless ``pages_needed`` pages are free."""
        free = self.tree.stats()["pages_free"]
        if pages_needed > free:
            raise self.out_of_pages(treeattn.OutOfPages(pages_needed, free, what))

    def layer_kv(self, layer: int) -> Mapping[str, torch.Tensor]:
        """Layer ``layer``'s pool as the decode op's keyword arguments (:meth:`treeattn.TreeKVCache.layer`):
        ``k_cache``, ``v_cache`` (``k_scale``, ``v_scale`` for FP8) for GQA, ``kv_cache`` (``kv_scale``) for MLA,
        so that ``treeattn.tree_decode(q, **cache.layer_kv(i), plan=cache.step.plan)`` fits every pool."""
        if isinstance(layer, int) and 0 <= layer < len(self._layer_kv):
            return self._layer_kv[layer]
        return self.tree.layer(layer)  # (which names what is wrong with ``layer``)

    @property
    def decoder(self) -> StepDecoder | MLAStepDecoder | None:
        """The running decode step's attention over ``step.plan`` (:func:`treeattn.decode.tree_decoder`, or
        :func:`~treeattn.decode.mla_tree_decoder` for MLA): its layers' calls are checked once. None outside a
        decode step."""
        return self._decoder

    def decode_kwargs(self, layer: int) -> dict[str, torch.Tensor]:
        """:meth:`layer_kv` as a plain dict, made once per cache (the attention unpacks it in every layer of
        every step). Do not change it."""
        return self._decode_kwargs[layer]

    # ---- steps ----

    def expect_prompt(self) -> None:
        """The next forward pass through the cache is a prompt batch: its rows become new leaves. The rows the
        cache holds now are not released (a driver that chose them owns them, see :meth:`set_rows`)."""
        self._check_idle("expect_prompt")
        self._expects_prompt = True

    def set_rows(self, leaves, *, slots: torch.Tensor | None = None, take: torch.Tensor | None = None) -> None:
        """The following decode steps run ``leaves`` (live nodes of :attr:`tree`) as the batch rows. Nothing is
        released: a driver that chooses each step's batch (``TreeSearch``) owns its nodes.

        ``slots`` (int64 ``[len(leaves)]``): the rows' new tokens were already appended by the driver, each
        row's at that slot (a speculative draft tree, grown node by node before its one verifying forward: a
        row may then be another row's ancestor). The next decode step writes there instead of appending.
        ``take`` (int64 ``[len(slots)]``, with ``slots``): the row whose new KV goes to each slot, where a row's
        token was also copied on write into a child's page before it was written (``slots`` then lists those
        copies too)."""
        self._check_idle("set_rows")
        self._past = ()
        rows = tuple(int(n) for n in leaves)
        want = len(rows) if take is None else take.shape[0]
        if slots is not None and (not isinstance(slots, torch.Tensor) or slots.shape != (want,)):
            got = list(slots.shape) if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"slots: expected an int64 tensor [{want}] (one per row, or per take), got {got}")
        self._rows = rows
        self._grown_slots = None if slots is None else (slots, take)
        self._expects_prompt = False

    def _check_idle(self, what: str) -> None:
        if self._step.mode != "idle":
            raise RuntimeError(f"TreeCache.{what}: expected no running step, got a {self._step.mode} step")

    @contextlib.contextmanager
    def prefill(self, num_rows: int, length: int, mask: torch.Tensor | None = None, *,
                row_of: list[int] | None = None, attention: str = "sdpa") -> Iterator[CacheStep]:
        """A prompt step over ``[num_rows, length]`` distinct prompt rows (padding where ``mask [num_rows,
        length]`` is 0): one root per row holding its real tokens. On a clean exit batch row ``i`` becomes a
        leaf forked from prompt row ``row_of[i]`` (default: row ``i``); on an exception the roots are released
        and the cache is as it was. ``attention``: the model's own implementation, which runs the prompt."""
        self._check_idle("prefill")
        past_leaves = self._past
        if past_leaves:  # this step's rows are distinct prompt rows: one leaf each
            past_leaves = tuple(past_leaves[row_of.index(u)] for u in range(num_rows)) if row_of else past_leaves
        self._past = ()
        if mask is None:
            real = [torch.arange(length)] * num_rows
        else:  # (continuing cached prefixes, the mask also covers the positions seen before)
            real = [torch.nonzero(row[row.shape[0] - length:]).flatten() for row in mask.detach().cpu()]
            if past_leaves:
                self._check_past_mask(mask.detach().cpu()[:, : mask.shape[1] - length], past_leaves)
        roots: list[int] = []
        slots = []
        try:
            for u, r in enumerate(real):
                leaf = past_leaves[u] if past_leaves else None
                if leaf is None:
                    roots.append(self._pages(lambda: self.tree.add(r.numel())))
                    slots.append(self.tree.slots(roots[-1]))
                else:
                    slots.append(self._pages(lambda: self.tree.append([leaf], r.numel())))
                    roots.append(leaf)
        except treeattn.OutOfPages as err:
            for root, leaf in zip(roots, past_leaves or [None] * len(roots)):
                if leaf is None:
                    self.tree.release(root)
            raise self.out_of_pages(err) from None
        past = tuple(0 if not past_leaves or past_leaves[u] is None else self.tree.length(roots[u]) - r.numel()
                     for u, r in enumerate(real)) if past_leaves else ()
        self._step = CacheStep(
            mode="prefill", rows=tuple(roots),
            slots=torch.cat(slots) if roots else None,
            take=torch.cat([u * length + r for u, r in enumerate(real)]).to(self.tree.device) if real else None,
            longest_row=max((self.tree.length(root) for root in roots), default=0), prompt_attention=attention,
            past=past,
        )
        # A prompt sees no past (TreeSearch adds prompts later), unless it continues cached prefixes.
        positions = self._positions
        if not past_leaves:
            self._positions = 0
        try:
            yield self._step
        except BaseException:
            for root in roots:
                self.tree.release(root)  # (a continued leaf too: the driver that lent it gave it to the step)
            self._positions = positions
            raise
        finally:
            self._step = _IDLE
        self._counts["forward_passes"] += 1
        row_of = list(range(num_rows)) if row_of is None else row_of
        uses = Counter(row_of)
        if self.on_prompt is not None:
            self.on_prompt(roots, row_of)
        children = {u: self.tree.fork(root, uses[u]) for u, root in enumerate(roots)}
        for root in roots:
            self.tree.release(root)  # its children keep the prompt
        self._rows = tuple([children[u].pop() for u in reversed(row_of)][::-1])
        self._expects_prompt = False
        self._positions = (positions if past_leaves else 0) + length

    def _check_past_mask(self, seen: torch.Tensor, leaves) -> None:
        """``seen [rows, positions]`` (the mask over the positions continued) must say what each continued leaf
        stores: padding first, then one for each stored token (a stored row is read whole)."""
        for u, leaf in enumerate(leaves):
            stored = 0 if leaf is None else self.tree.length(leaf)
            row = seen[u].bool()
            if int(row.sum()) != stored or not row[row.shape[0] - stored:].all():
                raise UnsupportedModel(
                    f"attention_mask: expected the {row.shape[0]} cached positions of row {u} as padding first, then "
                    f"ones for the {stored} tokens the cache holds (padding inside a sequence is stored once it was "
                    f"generated), got {int(row.sum())} ones elsewhere")

    @contextlib.contextmanager
    def decode(self, num_rows: int, num_tokens: int = 1) -> Iterator[CacheStep]:
        """A decode step: one new token for each of the ``num_rows`` rows (one append and one plan for every
        layer). The appended slots stay when the step raises (the rows' owner releases or keeps them)."""
        self._check_idle("decode")
        if num_tokens != 1:
            raise UnsupportedModel(
                f"input_ids: expected one new token per row after the prompt, got {num_tokens} "
                "(assisted decoding and prompt continuation are not supported)"
            )
        if num_rows != len(self._rows):
            raise RuntimeError(f"TreeCache: expected {len(self._rows)} rows (the cache's), got {num_rows}")
        grown, self._grown_slots = self._grown_slots, None
        slots, take = grown if grown is not None else (None, None)
        if slots is None:
            try:
                slots = self._pages(lambda: self.tree.append(self._rows))
            except treeattn.OutOfPages as err:
                raise self.out_of_pages(err) from None
        self._positions += 1
        self._step = self._decode_step(slots, take)
        try:
            # every layer writes these slots and reads this plan: checked once, launches prepared once
            self._writer = self.tree.writer(self._step.slots)
            self._decoder = (mla_tree_decoder if self.spec.mla else tree_decoder)(self._step.plan)
            yield self._step
        finally:
            self._step, self._writer, self._decoder = _IDLE, None, None
        self._counts["forward_passes"] += 1

    def _decode_step(self, slots: torch.Tensor, take: torch.Tensor | None) -> CacheStep:
        """The decode step over the rows' new ``slots`` (see :meth:`set_rows` for ``take``): its plan is made
        here (a compileable cache plans into fixed buffers instead)."""
        return CacheStep(
            mode="decode", rows=self._rows, slots=slots, take=take,
            plan=self.tree.plan(self._rows, num_qo_heads=self.spec.num_qo_heads),
            longest_row=max((n.end for n in self.tree.tree.nodes(self._rows, "decode", "rows")), default=0),
        )

    def write(self, layer: int, a: torch.Tensor, b: torch.Tensor):
        """Store a layer's new KV in the running step: ``a, b [rows, kv_heads, tokens, head_dim]`` (GQA keys
        and values) or ``[rows, 1, tokens, kv_lora_rank]`` and ``[rows, 1, tokens, rope_dim]`` (MLA latent and
        roped key). Returns ``(a, b)``: a prompt's own attention reads them; a decode step reads the tree."""
        step = self._step
        if step.mode == "idle":
            raise RuntimeError("TreeCache: written outside a step (use treeattn.hf.generate or treeattn.hf.TreeSearch)")
        rows, tokens = a.shape[0], a.shape[2]
        dtype = self.tree.dtype
        if self.spec.mla:
            flat = (torch.cat([a, b], dim=-1).transpose(1, 2).reshape(rows * tokens, -1),)
        elif tokens == 1:  # a decode step: [rows, kv_heads, 1, head_dim] -> [rows, kv_heads, head_dim], a view
            flat = (a.select(2, 0), b.select(2, 0))
        else:
            flat = tuple(t.transpose(1, 2).reshape(rows * tokens, t.shape[1], t.shape[3]) for t in (a, b))
        if step.take is not None:
            flat = tuple(t.index_select(0, step.take) for t in flat)
        if any(t.dtype != dtype or not t.is_contiguous() for t in flat):
            flat = tuple(t.to(dtype).contiguous() for t in flat)
        if self._writer is not None:
            self._writer(layer, *flat)
        else:
            self.tree.write(layer, step.slots, *flat)
        if step.past:  # the prompt's own attention also reads the cached prefixes, laid out as the past positions
            return self._with_past(layer, a, b)
        return a, b

    def _with_past(self, layer: int, a: torch.Tensor, b: torch.Tensor):
        """``a, b`` with each row's cached prefix in front, right-aligned in the ``positions`` seen before the
        step (left padding 0, as :meth:`dense_kv` lays rows out)."""
        parts = [self._dense_row(layer, node, n, self._positions) for node, n in zip(self._step.rows, self._step.past)]
        past = [torch.stack([p[i] for p in parts]).to(a.dtype) for i in range(2)]
        return torch.cat([past[0], a], dim=2), torch.cat([past[1], b], dim=2)

    # ---- reading rows back ----

    def _stored(self, layer: int, node: int, count: int | None = None) -> tuple[torch.Tensor, ...]:
        """The first ``count`` (default: all) stored rows of ``node``'s path in ``layer``, as ``write`` takes
        them: ``(k, v)`` ``[count, kv_heads, head_dim]`` or ``(kv,)`` ``[count, kv_lora_rank + rope_dim]``."""
        source = self.tree.path_slots(node)[:count]
        return tuple(p.flatten(0, 1)[source] for name, p in self.layer_kv(layer).items() if name.endswith("cache"))

    def _dense_row(self, layer: int, node: int, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` stored rows of ``node``'s path as a ``DynamicLayer`` row holds them: ``[heads,
        width, dim]`` twice (MLA: the latent and the roped key), right-aligned, left padding 0."""
        stored = self._stored(layer, node, count)
        if self.spec.mla:
            rows = stored[0][:, None]  # [count, 1, rank + rope]
            stored = (rows[..., : self.spec.kv_lora_rank], rows[..., self.spec.kv_lora_rank:])
        return tuple(torch.nn.functional.pad(t.transpose(0, 1), (0, 0, width - count, 0)) for t in stored)

    def dense_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer`` as a ``DynamicLayer`` would hold it (a copy): ``(keys, values)`` ``[rows, heads,
        positions, dim]``, every row's stored KV right-aligned (left padding is 0). See ``_TreeLayer``."""
        lengths = [self.tree.length(r) for r in self._rows]
        width = max([self._positions, *lengths])
        parts = [self._dense_row(layer, node, n, width) for node, n in zip(self._rows, lengths)]
        if not parts:
            shapes = ((1, self.spec.kv_lora_rank), (1, self.spec.rope_dim)) if self.spec.mla else \
                ((self.spec.num_kv_heads, self.spec.head_dim),) * 2
            empty = (torch.zeros(0, h, width, d, dtype=self.tree.dtype, device=self.tree.device) for h, d in shapes)
            return tuple(empty)
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    # ---- HF's cache operations as tree operations ----

    def _select(self, picks: list[int]) -> None:
        """Row ``i`` becomes old row ``picks[i]``: once-chosen rows go on, multiply-chosen rows fork, unchosen
        rows are released."""
        self._check_idle("select")
        old = self._rows
        if any(not 0 <= p < len(old) for p in picks):
            raise ValueError(f"indices: expected row indices in [0, {len(old)}), got {picks}")
        uses = Counter(picks)
        heirs: dict[int, list[int]] = {}
        for p, n in uses.items():
            heirs[p] = [old[p]] if n == 1 else self.tree.fork(old[p], n)
        for p, node in enumerate(old):
            if uses.get(p, 0) != 1:
                self.tree.release(node)  # not chosen, or its forks hold it now
        self._rows = tuple([heirs[p].pop() for p in reversed(picks)][::-1])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([r for r in range(len(self._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        self._select(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-k)`` drops every row's last ``k`` tokens (those rows are rebuilt unshared from their paths)."""
        self._check_idle("crop")
        if tokens_to_remove > 0:
            raise ValueError(
                f"tokens_to_remove: expected a count <= 0 (tokens to drop, negated), got {tokens_to_remove}")
        drop = -tokens_to_remove
        if drop == 0:
            return
        shortest = min((self.tree.length(r) for r in self._rows), default=0)
        if drop > shortest:
            raise ValueError(f"tokens_to_remove: expected at most {shortest} tokens (the shortest row), got {drop}")
        rebuilt = []
        try:
            for node in self._rows:
                keep = self.tree.length(node) - drop
                fresh = self._pages(lambda: self.tree.add(keep))
                rebuilt.append(fresh)
                target = self.tree.slots(fresh)
                for layer in range(self.spec.num_layers):
                    self.tree.write(layer, target, *self._stored(layer, node, keep))
        except treeattn.OutOfPages as err:
            for node in rebuilt:
                self.tree.release(node)
            raise self.out_of_pages(err) from None
        for node in self._rows:
            self.tree.release(node)
        self._rows = tuple(rebuilt)
        self._positions -= drop

    def release(self) -> None:
        """Release every row: all pages return to the pool (the cache is empty afterwards; the next forward
        pass through it is a prompt)."""
        self._check_idle("release")
        for node in self._rows:
            self.tree.release(node)
        self._rows = ()
        self._positions, self._expects_prompt = 0, True

    def reset(self) -> None:
        self.release()
