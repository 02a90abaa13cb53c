"""Speculative decoding inside :func:`treeattn.hf.generate`: draft a token tree per sequence, verify it in one
target forward over the :class:`~treeattn.hf.TreeCache`, emit what the target agrees with.

``model.generate`` prepares everything (generation config, special tokens, padding mask, position ids,
``num_return_sequences`` expansion, transformers' own logits processors and stopping criteria) and hands the
decoding loop to :func:`speculative_decoding` (its ``custom_generate``). Each step, for every unfinished row:

- the drafter proposes a :class:`~treeattn.speculative.DraftTree` after the row's last emitted token (the
  *pending* token, whose KV is not in the cache yet): n-gram continuations of the row's own history (and of
  the sequences a prefix cache holds under the call's key), or a small draft model's top-k tree, the draft
  model decoded over its own cache (:mod:`treeattn.hf.draft`);
- the pending token and every draft token become 1-token cache nodes, each a child of its draft parent (the
  pending token's node a child of the row's leaf), so a node's KV path is its ancestors over the shared
  context; one forward over all of them (position = the row's stored tokens + depth) runs
  ``tree_decode`` / ``mla_tree_decode`` with one query per node through ``cache.tree.plan(nodes)``;
- each node's logits go through the logits processors with that node's own prefix, and
  :func:`~treeattn.speculative.verify_greedy` / :func:`~treeattn.speculative.verify_sampling` accept the
  longest path the target agrees with plus the target's own next token. The accepted nodes' KV stays (the
  last becomes the row's leaf; a row that stops inside the path keeps only what it emitted); the rejected
  nodes are released and their pages return to the pool.

Tokens are emitted one at a time through the stopping criteria, so EOS, stop strings and ``max_length`` end a
row exactly where ``model.generate`` would: greedy output is ``model.generate``'s token for token, and
sampled output follows exactly the target's distribution.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

import treeattn

from ..speculative import (
    ROOT,
    CachedContinuations,
    DraftTree,
    NgramIndex,
    draft_ngram_tree,
    verify_greedy,
    verify_sampling,
)
from .adapter import UnsupportedModel, unwrap_compiled
from .draft import DraftModelDrafter
from .tree_nodes import grow_nodes, keep_chain, step_slots

# model.generate options the speculative loop does not produce (it emits several tokens per forward).
_UNSUPPORTED_WITH_SPECULATION = {
    "output_scores": "per-step scores",
    "output_logits": "per-step logits",
    "output_hidden_states": "hidden states",
    "output_attentions": "attention weights",
}


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How :func:`treeattn.hf.generate` speculates: ``drafter`` is ``"ngram"`` or a draft model (a HF causal LM
    with the target's vocabulary), ``num_speculative_tokens`` the draft tree's size per step, ``top_k`` the
    draft model's branching."""

    drafter: object
    num_speculative_tokens: int
    top_k: int = 2

    def extra_pages(self, num_rows: int) -> int:
        """Pages a step's draft trees may hold beyond the rows' own paths: one per node (a sibling copies its
        parent's last page on write) and one for each row's pending token."""
        return num_rows * (self.num_speculative_tokens + 2)

    def check(self, config) -> None:
        """Raise for ``generate`` options speculation cannot serve exactly (``config``: the generation config)."""
        if (config.num_beams or 1) > 1:
            raise UnsupportedModel(
                "num_beams: expected 1 with speculative decoding (beam search is not speculated), "
                f"got {config.num_beams}"
            )
        for name, what in _UNSUPPORTED_WITH_SPECULATION.items():
            if getattr(config, name, False):
                raise UnsupportedModel(f"{name}: {what} are not returned with speculative decoding")


def speculation_from(model, speculative, num_speculative_tokens, generate_kwargs: dict) -> Speculation | None:
    """The :class:`Speculation` that ``generate``'s arguments ask for, or None. HF's own ``assistant_model=``
    and ``prompt_lookup_num_tokens=`` (taken out of ``generate_kwargs``) ask for a draft model and for n-gram
    drafting of that many tokens; the n-gram tree branches where the history continues in different ways (a
    chain when it does not)."""
    assistant = generate_kwargs.pop("assistant_model", None)
    lookup = generate_kwargs.pop("prompt_lookup_num_tokens", None)
    chosen = [what for what, value in (("speculative", speculative), ("assistant_model", assistant),
                                       ("prompt_lookup_num_tokens", lookup)) if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"speculative: expected one of speculative, assistant_model, prompt_lookup_num_tokens, "
                         f"got {' and '.join(chosen)}")
    if lookup is not None:
        speculative, num_speculative_tokens = "ngram", lookup
    if assistant is not None:
        speculative = assistant
        if num_speculative_tokens is None:
            config = generate_kwargs.get("generation_config") or model.generation_config
            num_speculative_tokens = generate_kwargs.get("num_assistant_tokens",
                                                         getattr(config, "num_assistant_tokens", None))
    if speculative is None:
        if num_speculative_tokens is not None:
            raise ValueError("num_speculative_tokens: expected None without speculative=, got "
                             f"{num_speculative_tokens!r}")
        return None
    if num_speculative_tokens is None:
        num_speculative_tokens = 8
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) \
            or num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens: expected an int >= 1, got {num_speculative_tokens!r}")
    if isinstance(speculative, str):
        if speculative != "ngram":
            raise ValueError(f"speculative: expected 'ngram' or a draft model, got {speculative!r}")
        return Speculation("ngram", num_speculative_tokens)
    name = "assistant_model" if assistant is not None else "speculative"
    draft = unwrap_compiled(speculative)
    if not isinstance(draft, torch.nn.Module) or not hasattr(draft, "config"):
        raise ValueError(
            f"{name}: expected 'ngram' or a draft model (a HF causal LM), got {type(speculative).__name__}")
    if draft is unwrap_compiled(model):
        # (the target's attention runs through its TreeCache during generate, so it cannot also draft plainly)
        raise UnsupportedModel(f"{name}: expected a draft model other than the target model itself, got the target")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    draft_vocab = draft.config.get_text_config(decoder=True).vocab_size
    if draft_vocab != vocab:
        raise ValueError(f"{name}: expected a draft model with the target's vocabulary ({vocab} tokens), "
                         f"got {draft_vocab}")
    return Speculation(draft, num_speculative_tokens)


@dataclasses.dataclass(eq=False)  # rows are told apart by identity (two rows may hold the same tokens)
class _Row:
    """One sequence of the batch: every id (padding included, what the logits processors and the output see),
    its real tokens for drafting, its cache leaf and its last emitted token (not in the cache yet)."""

    b: int  # its row in the batch
    ids: list[int]
    leaf: int
    real: list[int]
    pending: int = -1
    finished_at: int | None = None  # length when a stopping criterion first ended it


class _NgramDrafter:
    """N-gram draft trees of each row's own history (an index per row, extended as tokens arrive)."""

    forward_passes = 0  # (no draft model)

    def __init__(self, num_speculative_tokens: int, sources=None):
        self.budget = num_speculative_tokens
        self.sources = sources  # real tokens -> more TokenSources (a prefix cache's cached sequences), or None
        self._index: dict[int, NgramIndex] = {}
        self._first: dict[tuple, NgramIndex] = {}  # rows of one history copy its index instead of rebuilding it

    def __enter__(self) -> _NgramDrafter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        return None

    def trees(self, rows: list[tuple[int, list[int], int]]) -> list[DraftTree]:
        """One tree per ``(b, real, max_depth)``, after ``real``'s last token, at most ``max_depth`` deep."""
        out = []
        for b, real, depth in rows:
            index = self._index.get(b)
            if index is None:  # (every row's index is made at the first step, before any is extended)
                key = tuple(real)
                index = self._first[key].copy() if key in self._first else self._first.setdefault(key, NgramIndex(real))
                self._index[b] = index
            index.extend(real[len(index):])
            if depth <= 0:
                out.append(DraftTree.empty())
                continue
            sources = () if self.sources is None else self.sources(real)
            out.append(_shallow(draft_ngram_tree(index, self.budget, sources=sources), depth))
        return out

    def accepted(self, b: int, path: list[int]) -> None:
        return None


def _drafter(speculation: Speculation, cache, cache_key, num_rows: int, max_length: int):
    """The drafter of one call: n-gram (over the rows' histories, and the sequences ``cache``'s prefix cache
    holds under ``cache_key`` when it has one), or the draft model over a pool of its own (sized as the
    target's: each row's path plus a draft tree per step)."""
    if speculation.drafter == "ngram":
        if cache.prefixes is None:
            return _NgramDrafter(speculation.num_speculative_tokens)
        index = cache.prefixes.index
        return _NgramDrafter(speculation.num_speculative_tokens,
                             lambda real: [CachedContinuations(index, cache_key, real)])
    from .generate import default_num_pages  # (generate imports this module)

    page_size = cache.page_size
    num_pages = default_num_pages(num_rows, max_length, page_size) + speculation.extra_pages(num_rows)
    return DraftModelDrafter(speculation.drafter, speculation.num_speculative_tokens, speculation.top_k,
                             page_size=page_size, num_pages=num_pages)


def _shallow(tree: DraftTree, max_depth: int) -> DraftTree:
    """``tree`` without the nodes deeper than ``max_depth`` (parents precede children, so indices stay ordered)."""
    if tree.max_depth <= max_depth:
        return tree
    keep = [i for i, d in enumerate(tree.depth.tolist()) if d <= max_depth]
    new = {old: i for i, old in enumerate(keep)}
    parents = tree.parents.tolist()
    return DraftTree(tree.tokens[keep], [ROOT if parents[i] == ROOT else new[parents[i]] for i in keep])


def _processed(logits_processor, batch_size: int, requests: list[tuple[int, list[int]]], logits: torch.Tensor,
               device) -> torch.Tensor:
    """``logits [len(requests), vocab]`` through the logits processors, request ``k = (b, ids)`` as batch row
    ``b`` with ``ids`` before it: processors may read per-row state of the batch (a per-row prompt length), so
    each call is a whole ``[batch_size, length]`` batch, one call per group of requests of one length and
    distinct rows (the other rows of a call are fillers whose scores are dropped). Returns the processed
    scores in request order."""
    out = torch.empty_like(logits)
    todo = list(range(len(requests)))
    while todo:
        length = len(requests[todo[0]][1])
        taken, rest, used = [], [], set()
        for k in todo:
            b, ids = requests[k]
            (taken if len(ids) == length and b not in used else rest).append(k)
            if taken and taken[-1] == k:
                used.add(b)
        filler = requests[taken[0]][1]
        ids = [filler] * batch_size
        scores = torch.zeros(batch_size, logits.shape[1], dtype=logits.dtype, device=logits.device)
        for k in taken:
            b = requests[k][0]
            ids[b] = requests[k][1]
            scores[b] = logits[k]
        scores = logits_processor(torch.tensor(ids, device=device), scores)
        for k in taken:
            out[k] = scores[requests[k][0]]
        todo = rest
    return out


def _trim(cache, row: _Row, length: int) -> None:
    """Cut ``row``'s cached path back to its first ``length`` tokens, if it holds more."""
    tree = cache.tree
    if 0 < length < tree.length(row.leaf):
        leaf = cache._pages(lambda: tree.fork_at(row.leaf, length))
        tree.release(row.leaf)
        row.leaf = leaf


def speculative_decoding(speculation: Speculation, cache_key=None):
    """The ``custom_generate`` decoding loop ``model.generate`` runs for ``speculation`` (``cache_key``: the
    prefix cache's isolation key, when the cache has one)."""

    @torch.no_grad()
    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, **model_kwargs):
        speculation.check(generation_config)
        if streamer is not None or synced_gpus:
            raise UnsupportedModel("streamer: streaming and synced_gpus are not supported with speculative decoding")
        if model_kwargs.get("inputs_embeds") is not None or input_ids.shape[1] == 0:
            raise UnsupportedModel("inputs_embeds: speculative decoding drafts from token ids; pass input_ids")
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        device = input_ids.device
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        pad = generation_config._pad_token_tensor
        pad = None if pad is None else int(pad)
        sample = bool(generation_config.do_sample)

        mask = model_kwargs.get("attention_mask")
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        scores = logits_processor(input_ids, outputs.logits[:, -1].to(dtype=torch.float32, device=device))
        del outputs
        if sample:
            first = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            first = scores.argmax(dim=-1)
        rows = [_Row(b, list(ids), cache.rows[b], ids if mask is None else
                     [t for t, m in zip(ids, mask[b].tolist()) if m]) for b, ids in enumerate(input_ids.tolist())]
        max_length = stopping_criteria.max_length if stopping_criteria.max_length is not None else \
            generation_config.max_length

        unfinished = [len(rows)]  # rows no stopping criterion has ended yet
        end = [max_length]  # without EOS: the output's length once every row has stopped

        def emit(row: _Row, token: int, score: torch.Tensor) -> None:
            row.ids.append(token)
            row.real.append(token)
            row.pending = token
            if row.finished_at is None and bool(stopping_criteria(torch.tensor([row.ids], device=device),
                                                                  score[None])[0]):
                row.finished_at = len(row.ids)
                unfinished[0] -= 1
                if not unfinished[0]:
                    end[0] = max(r.finished_at for r in rows)

        for b, row in enumerate(rows):
            emit(row, int(first[b]), scores[b])

        def active(row: _Row) -> bool:
            if has_eos:
                return row.finished_at is None
            return len(row.ids) < end[0]  # (without EOS a stopped row goes on until every row has stopped, as in HF)

        tree = cache.tree
        with _drafter(speculation, cache, cache_key, len(rows), max_length) as drafter:
            drafter.prefill(input_ids, mask)
            while True:
                live = [r for r in rows if active(r)]
                if not live:
                    break
                trees = drafter.trees([(r.b, r.real, (max_length - len(r.ids)) - 1) for r in live])
                made: list[int] = []
                try:
                    try:
                        nodes = grow_nodes(cache, [r.leaf for r in live], trees, made)
                    except treeattn.OutOfPages as err:
                        raise cache.out_of_pages(err) from None
                    flat = [n for row_nodes in nodes for n in row_nodes]
                    slots, take = step_slots(tree, trees, nodes)
                    tokens, positions = [], []
                    for row, draft in zip(live, trees):
                        base = tree.length(row.leaf)
                        tokens += [row.pending] + draft.tokens.tolist()
                        positions += [base] + (base + draft.depth).tolist()
                    cache.set_rows(flat, slots=slots, take=take)
                    logits = model(input_ids=torch.tensor(tokens, device=device)[:, None],
                                   position_ids=torch.tensor(positions, device=device)[:, None],
                                   cache=cache, use_cache=True).logits[:, -1].float()
                except BaseException:
                    for node in reversed(made):
                        tree.release(node)
                    cache.set_rows([r.leaf for r in rows])
                    raise
                requests = []  # (batch row, the node's prefix) per forward row
                for row, draft in zip(live, trees):
                    requests.append((row.b, row.ids))
                    requests += [(row.b, row.ids + draft.path_tokens(i)) for i in range(draft.num_nodes)]
                every = _processed(logits_processor, len(rows), requests, logits, device)
                start = 0
                for row, draft, row_nodes in zip(live, trees, nodes):
                    processed = every[start:start + draft.num_nodes + 1]
                    start += draft.num_nodes + 1
                    if sample:
                        result = verify_sampling(draft, torch.softmax(processed, dim=-1))
                    else:
                        result = verify_greedy(draft, processed)
                    cache.count_draft(result.draft_tokens, result.accepted_draft_tokens)
                    emitted = 0
                    for token, at in zip(result.tokens.tolist(), [ROOT] + result.path):
                        if not active(row):
                            break
                        emit(row, token, processed[at + 1])
                        emitted += 1
                    # The cache keeps what was emitted but the new pending token (a stopped row emits less).
                    kept = result.path[:max(emitted - 1, 0)]
                    row.leaf = keep_chain(tree, row_nodes, kept, row.leaf)
                    drafter.accepted(row.b, kept)
            cache.count_draft(0, 0, drafter.forward_passes)

        if has_eos:
            length = max(len(r.ids) for r in rows)
            ids = [r.ids + [pad] * (length - len(r.ids)) for r in rows]
        else:
            ids = [r.ids[:end[0]] for r in rows]
        for row, out in zip(rows, ids):  # a row that ran past the others' end holds no KV beyond its output
            _trim(cache, row, len(row.real) - (len(row.ids) - min(len(out), len(row.ids))))
        cache.set_rows([r.leaf for r in rows])
        sequences = torch.tensor(ids, dtype=input_ids.dtype, device=device)
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, cache=cache)
        return sequences

    return decode
