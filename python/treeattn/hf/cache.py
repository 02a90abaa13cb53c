"""TreeCache: a ``transformers.Cache`` whose batch rows are leaves of a ``treeattn.TreeKVCache``.

Every row of the batch is a leaf node; its KV is the root→leaf path, so rows that share a prefix (the samples
or beams of one prompt) store it once and read it once per step. HF's cache operations are tree operations:

- ``batch_repeat_interleave(n)``: each row forks into ``n`` rows (no copy);
- ``reorder_cache(beam_idx)``: a row chosen once goes on as it is, a row chosen ``c > 1`` times forks into ``c``
  rows, a row not chosen is released (its pages return to the pool unless a chosen row still needs them);
- ``batch_select_indices(indices)``: the same with the rows kept; ``crop(-k)``: every row without its last ``k``
  tokens.

A decode step appends one slot to every row and makes one ``TreePlan``, which every layer reuses. Padding is
not stored: a left-padded prompt holds only its real tokens, which is what the model's padding mask lets a
query see.
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import treeattn

from .adapter import ModelSpec, UnsupportedModel, inspect_model

DEFAULT_TOKENS = 16384  # pool size (in tokens) when num_pages is not given


class _TreeLayer(CacheLayerMixin):
    """One layer's view of a :class:`TreeCache` (transformers walks ``cache.layers`` for per-layer facts)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: "TreeCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner._positions + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner._positions

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        return None

    def offload(self):
        return None

    def prefetch(self):
        return None


def _with_hint(err: treeattn.OutOfPages, num_pages: int, page_size: int, where: str) -> treeattn.OutOfPages:
    hint = treeattn.OutOfPages(err.pages_needed, err.pages_free)
    more = num_pages + err.pages_needed - err.pages_free
    hint.args = (
        f"{err.args[0]}; the TreeCache pool has num_pages={num_pages} (page_size={page_size}): pass num_pages="
        f"{max(more, 2 * num_pages)} or more to {where}",
    )
    return hint


class TreeCache(Cache):
    """A ``transformers.Cache`` over a ``treeattn.TreeKVCache``: each batch row is a leaf of the tree.

    Args:
        model: the HF causal LM it serves (its KV layout and dtype/device are read from it).
        page_size: tokens per page.
        num_pages: pool size (default: room for 16384 tokens).
        device, dtype: of the pool (default: the model's).

    ``stats()`` reports what the tree stores (``tokens_stored``) against one cache per row
    (``tokens_if_unshared``), see ``treeattn.TreeKVCache.stats``. ``tree`` is the ``TreeKVCache`` and ``rows``
    the leaf node of each batch row. Used through :func:`treeattn.hf.generate` (which sizes the pool).
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None, device=None, dtype=None):
        self.spec: ModelSpec = inspect_model(model)
        spec = self.spec
        if num_pages is None:
            num_pages = -(-DEFAULT_TOKENS // page_size) if isinstance(page_size, int) and page_size > 0 else 1
        parameter = next(model.parameters())
        device = parameter.device if device is None else torch.device(device)
        dtype = parameter.dtype if dtype is None else dtype
        if spec.mla:
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
        self.rows: list[int] = []  # leaf node of each batch row
        self.plan: treeattn.TreePlan | None = None  # the running decode step's plan (every layer reads it)
        self.hint_where = "TreeCache(...)"
        self._positions = 0  # positions each row has seen, padding included (what transformers calls seq length)
        self._needs_prefill = True
        self._mode = "idle"
        self._slots: torch.Tensor | None = None
        self._take: torch.Tensor | None = None  # prefill: flat [row * length + position] of the real tokens
        self._roots: list[int] = []
        self._longest_row = 0
        self._prompt_length = 0
        self._prefill_implementation = "sdpa"

    # ---- facts transformers asks for ----

    @property
    def page_size(self) -> int:
        return self.tree.page_size

    @property
    def num_pages(self) -> int:
        return self.tree.num_pages

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def is_compileable(self) -> bool:
        return False

    def stats(self) -> dict:
        """``TreeKVCache.stats()`` of the tree: ``tokens_stored`` vs ``tokens_if_unshared``, pages and bytes."""
        return self.tree.stats()

    def __repr__(self) -> str:
        return f"TreeCache(rows={len(self.rows)}, positions={self._positions}, {self.tree!r})"

    # ---- steps (opened by the model's routed forward, see adapter.attached) ----

    def _out_of_pages(self, err):
        return _with_hint(err, self.num_pages, self.page_size, self.hint_where)

    def _begin_prefill(self, num_rows: int, length: int, mask: torch.Tensor | None) -> None:
        """Prompt rows ``[num_rows, length]`` (padding where ``mask`` is 0): one root per row holding its real tokens."""
        if mask is None:
            real = [torch.arange(length)] * num_rows
        else:
            real = [torch.nonzero(row).flatten() for row in mask.detach().cpu()]
        roots = []
        try:
            for r in real:
                roots.append(self.tree.add(r.numel()))
        except treeattn.OutOfPages as err:
            for root in roots:
                self.tree.release(root)
            raise self._out_of_pages(err) from None
        self._roots = roots
        self._take = torch.cat([u * length + r for u, r in enumerate(real)]).to(self.tree.device)
        self._slots = torch.cat([self.tree.slots(root) for root in roots]) if roots else None
        self._longest_row = max((r.numel() for r in real), default=0)
        self._prompt_length = length
        self._positions = 0  # a prompt sees no past (TreeSearch prefills later prompts into a used cache)
        self._mode = "prefill"

    def _abort_prefill(self) -> None:
        for root in self._roots:
            self.tree.release(root)
        self._roots, self._mode = [], "idle"

    def _end_prefill(self, row_of: list[int]) -> None:
        """Batch row ``i`` continues prompt row ``row_of[i]``: a leaf forked from that prompt's root."""
        uses = Counter(row_of)
        children = {u: self.tree.fork(root, uses[u]) for u, root in enumerate(self._roots)}
        for root in self._roots:
            self.tree.release(root)  # its children keep the prompt
        self.rows = [children[u].pop() for u in reversed(row_of)][::-1]
        self._roots, self._mode, self._needs_prefill = [], "idle", False
        self._positions = self._prompt_length

    def _begin_decode(self, num_rows: int, num_tokens: int) -> None:
        if num_tokens != 1:
            raise UnsupportedModel(
                f"input_ids: expected one new token per row after the prompt, got {num_tokens} "
                "(assisted decoding and prompt continuation are not supported)"
            )
        if num_rows != len(self.rows):
            raise RuntimeError(f"TreeCache: expected {len(self.rows)} rows (the cache's), got {num_rows}")
        try:
            self._slots = self.tree.append(self.rows)
        except treeattn.OutOfPages as err:
            raise self._out_of_pages(err) from None
        self.plan = self.tree.plan(self.rows, num_qo_heads=self.spec.num_qo_heads)
        self._longest_row = max((self.tree.length(r) for r in self.rows), default=0)
        self._positions += 1
        self._mode = "decode"

    def _end_step(self) -> None:
        self._mode = "idle"

    def _write(self, layer: int, a: torch.Tensor, b: torch.Tensor):
        """Store a layer's new KV: ``a, b [rows, kv_heads, tokens, head_dim]`` (GQA keys and values) or
        ``[rows, 1, tokens, kv_lora_rank]`` and ``[rows, 1, tokens, rope_dim]`` (MLA latent and roped key)."""
        if self._mode not in ("prefill", "decode"):
            raise RuntimeError("TreeCache: written outside a step (use treeattn.hf.generate or treeattn.hf.TreeSearch)")
        rows, tokens = a.shape[0], a.shape[2]
        if self.spec.mla:
            flat = torch.cat([a, b], dim=-1).transpose(1, 2).reshape(rows * tokens, -1)
            if self._mode == "prefill":
                flat = flat.index_select(0, self._take)
            self.tree.write(layer, self._slots, flat.to(self.tree.dtype).contiguous())
        else:
            k = a.transpose(1, 2).reshape(rows * tokens, a.shape[1], a.shape[3])
            v = b.transpose(1, 2).reshape(rows * tokens, b.shape[1], b.shape[3])
            if self._mode == "prefill":
                k, v = k.index_select(0, self._take), v.index_select(0, self._take)
            self.tree.write(layer, self._slots, k.to(self.tree.dtype).contiguous(), v.to(self.tree.dtype).contiguous())
        return a, b  # the model's own attention (prefill) reads them; a decode step reads the tree

    # ---- HF's cache operations as tree operations ----

    def _select(self, picks: list[int]) -> None:
        """Row ``i`` becomes old row ``picks[i]``: once-chosen rows go on, multiply-chosen rows fork, unchosen
        rows are released."""
        old = self.rows
        if any(not 0 <= p < len(old) for p in picks):
            raise ValueError(f"indices: expected row indices in [0, {len(old)}), got {picks}")
        uses = Counter(picks)
        heirs: dict[int, list[int]] = {}
        for p, n in uses.items():
            heirs[p] = [old[p]] if n == 1 else self.tree.fork(old[p], n)
        for p, node in enumerate(old):
            if uses.get(p, 0) != 1:
                self.tree.release(node)  # not chosen, or its forks hold it now
        self.rows = [heirs[p].pop() for p in reversed(picks)][::-1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([r for r in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        self._select(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-k)`` drops every row's last ``k`` tokens (those rows are rebuilt unshared from their paths)."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: expected a count <= 0 (tokens to drop, negated), got {tokens_to_remove}")
        drop = -tokens_to_remove
        if drop == 0:
            return
        shortest = min((self.tree.length(r) for r in self.rows), default=0)
        if drop > shortest:
            raise ValueError(f"tokens_to_remove: expected at most {shortest} tokens (the shortest row), got {drop}")
        rebuilt = []
        try:
            for node in self.rows:
                keep = self.tree.length(node) - drop
                source = self.tree.path_slots(node)[:keep]
                fresh = self.tree.add(keep)
                rebuilt.append(fresh)
                target = self.tree.slots(fresh)
                for layer in range(self.spec.num_layers):
                    pools = self.tree.layer(layer)
                    if self.spec.mla:
                        self.tree.write(layer, target, pools.reshape(-1, pools.shape[-1])[source])
                    else:
                        k, v = (p.reshape(-1, *p.shape[2:])[source] for p in pools)
                        self.tree.write(layer, target, k, v)
        except treeattn.OutOfPages as err:
            for node in rebuilt:
                self.tree.release(node)
            raise self._out_of_pages(err) from None
        for node in self.rows:
            self.tree.release(node)
        self.rows = rebuilt
        self._positions -= drop

    def release(self) -> None:
        """Release every row: all pages return to the pool (the cache is empty afterwards)."""
        for node in self.rows:
            self.tree.release(node)
        self.rows = []
        self.plan = None
        self._positions, self._needs_prefill = 0, True

    def reset(self) -> None:
        self.release()
