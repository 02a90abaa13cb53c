"""Speculative decoding inside :func:`treeattn.hf.generate`: draft a token tree per sequence, verify it in one
target forward over the :class:`~treeattn.hf.TreeCache`, emit what the target agrees with.

``model.generate`` prepares everything (generation config, special tokens, padding mask, position ids,
``num_return_sequences`` expansion, transformers' own logits processors and stopping criteria) and hands the
decoding loop to :func:`speculative_decoding` (its ``custom_generate``). Each step, for every unfinished row:

- the drafter proposes a :class:`~treeattn.speculative.DraftTree` after the row's last emitted token (the
  *pending* token, whose KV is not in the cache yet): n-gram continuations of the row's own history, or a
  small draft model's top-k tree;
- the pending token and every draft token become 1-token cache nodes, each a child of its draft parent (the
  pending token's node a child of the row's leaf), so a node's KV path is its ancestors over the shared
  context; one forward over all of them (position = the row's stored tokens + depth) runs
  ``tree_decode`` / ``mla_tree_decode`` with one query per node through ``cache.tree.plan(nodes)``;
- each node's logits go through the logits processors with that node's own prefix, and
  :func:`~treeattn.speculative.verify_greedy` / :func:`~treeattn.speculative.verify_sampling` accept the
  longest path the target agrees with plus the target's own next token. The accepted nodes' KV stays (the
  last becomes the row's leaf); the rejected nodes are released and their pages return to the pool.

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
    DraftTree,
    NgramIndex,
    draft_model_tree,
    draft_ngram_tree,
    verify_greedy,
    verify_sampling,
)
from .adapter import UnsupportedModel, unwrap_compiled

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
    index: NgramIndex | None
    real: list[int]
    pending: int = -1
    finished_at: int | None = None  # length when a stopping criterion first ended it


class _Drafter:
    """Proposes each row's draft tree after its pending token."""

    def __init__(self, speculation: Speculation, device):
        self.speculation, self.device = speculation, device

    def tree(self, row: _Row, max_depth: int) -> DraftTree:
        budget = self.speculation.num_speculative_tokens
        if max_depth <= 0:
            return DraftTree.empty()
        if row.index is not None:
            return _shallow(draft_ngram_tree(row.index, budget), max_depth)
        draft = self.speculation.drafter
        context = row.real

        def next_logits(paths):
            # Plain forwards of the draft model over context + path (no cache of its own): simple and exact.
            ids = torch.tensor([context + p for p in paths], device=self.device)
            return draft(input_ids=ids, use_cache=False).logits[:, -1].float()

        return draft_model_tree(next_logits, budget, top_k=self.speculation.top_k, max_depth=max_depth)


def _shallow(tree: DraftTree, max_depth: int) -> DraftTree:
    """``tree`` without the nodes deeper than ``max_depth`` (parents precede children, so indices stay ordered)."""
    if tree.max_depth <= max_depth:
        return tree
    keep = [i for i, d in enumerate(tree.depth.tolist()) if d <= max_depth]
    new = {old: i for i, old in enumerate(keep)}
    parents = tree.parents.tolist()
    return DraftTree(tree.tokens[keep], [ROOT if parents[i] == ROOT else new[parents[i]] for i in keep])


def _grow_nodes(cache, rows: list[_Row], trees: list[DraftTree], made: list[int]) -> list[list[int]]:
    """The cache nodes of one verification step: for each row, its pending token's node (a child of the row's
    leaf) then one per draft node (a child of its draft parent's), each holding one appended slot. Every node
    made is added to ``made``. Returns each row's nodes, ``[pending, node 0, node 1, ...]``."""
    tree = cache.tree
    node_of: list[dict[int, int]] = []  # per row: draft node (ROOT: the pending token) -> cache node
    for row in rows:
        node_of.append({ROOT: tree.fork(row.leaf, 1)[0]})
        made.append(node_of[-1][ROOT])
    tree.append([n[ROOT] for n in node_of])
    # Depth by depth: a node can fork only once its own slot is appended (then it is no longer a leaf).
    for depth in range(1, max((t.max_depth for t in trees), default=0) + 1):
        grown = []
        for draft, nodes in zip(trees, node_of):
            parents = draft.parents.tolist()
            by_parent: dict[int, list[int]] = {}
            for i, d in enumerate(draft.depth.tolist()):
                if d == depth:
                    by_parent.setdefault(parents[i], []).append(i)
            for parent, kids in by_parent.items():
                forks = tree.fork(nodes[parent], len(kids))
                made.extend(forks)
                nodes.update(zip(kids, forks))
                grown.extend(forks)
        tree.append(grown)
    return [[nodes[i] for i in range(ROOT, draft.num_nodes)] for draft, nodes in zip(trees, node_of)]


def _step_slots(tree, trees: list[DraftTree], nodes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the verifying forward writes each node's KV: ``(slots, take)``, ``take[j]`` the forward row (node,
    row-major as ``nodes``) written to ``slots[j]``. A node's own slot, and every copy of it: a sibling that
    appended after its parent's page was claimed copied that page on write *before* this forward wrote the
    parent's KV, so the copy's slot must get it too (as each node's path reads it there)."""
    device = tree.device
    own = [int(tree.slots(n)[-1]) for row_nodes in nodes for n in row_nodes]
    pairs = {(slot, j) for j, slot in enumerate(own)}
    base = 0
    for draft, row_nodes in zip(trees, nodes):
        for i in range(draft.num_nodes):
            chain = [ROOT] + draft.path(i)  # the pending token, then node i's draft ancestors and itself
            path = tree.path_slots(row_nodes[i + 1])[-len(chain):].tolist()
            pairs.update((slot, base + a + 1) for slot, a in zip(path, chain))
        base += draft.num_nodes + 1
    slots, take = zip(*sorted(pairs))
    return torch.tensor(slots, dtype=torch.int64, device=device), torch.tensor(take, dtype=torch.int64, device=device)


def _release_rejected(tree, row_nodes: list[int], accepted: list[int], old_leaf: int) -> int:
    """Keep the accepted chain (pending node, then the accepted draft nodes) and return its last node, the
    row's new leaf; release every other node of the row's step and the handles of the chain's inner nodes."""
    chain = [row_nodes[0]] + [row_nodes[i + 1] for i in accepted]
    keep = set(chain)
    for node in reversed(row_nodes):
        if node not in keep:
            tree.release(node)
    for node in [old_leaf, *chain[:-1]]:
        tree.release(node)  # (their tokens stay: the new leaf's path reads them)
    return chain[-1]


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


def speculative_decoding(speculation: Speculation):
    """The ``custom_generate`` decoding loop ``model.generate`` runs for ``speculation``."""

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
        rows: list[_Row] = []
        prompts: dict[tuple, NgramIndex] = {}
        for b, ids in enumerate(input_ids.tolist()):
            real = ids if mask is None else [t for t, m in zip(ids, mask[b].tolist()) if m]
            index = None
            if speculation.drafter == "ngram":  # rows of one prompt copy its index instead of rebuilding it
                key = tuple(real)
                index = prompts[key].copy() if key in prompts else prompts.setdefault(key, NgramIndex(real))
            rows.append(_Row(b, list(ids), cache.rows[b], index, list(real)))
        drafter = _Drafter(speculation, device)
        max_length = stopping_criteria.max_length if stopping_criteria.max_length is not None else \
            generation_config.max_length

        unfinished = [len(rows)]  # rows no stopping criterion has ended yet
        end = [max_length]  # without EOS: the output's length once every row has stopped

        def emit(row: _Row, token: int, score: torch.Tensor) -> None:
            row.ids.append(token)
            row.real.append(token)
            if row.index is not None:
                row.index.extend([token])
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
        while True:
            live = [r for r in rows if active(r)]
            if not live:
                break
            trees = [drafter.tree(r, (max_length - len(r.ids)) - 1) for r in live]
            made: list[int] = []
            try:
                try:
                    nodes = _grow_nodes(cache, live, trees, made)
                except treeattn.OutOfPages as err:
                    raise cache.out_of_pages(err) from None
                flat = [n for row_nodes in nodes for n in row_nodes]
                slots, take = _step_slots(tree, trees, nodes)
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
                row.leaf = _release_rejected(tree, row_nodes, result.path, row.leaf)
                rows_at = [ROOT] + result.path
                for token, at in zip(result.tokens.tolist(), rows_at):
                    if not active(row):
                        break
                    emit(row, token, processed[at + 1])
        cache.set_rows([r.leaf for r in rows])

        if has_eos:
            length = max(len(r.ids) for r in rows)
            ids = [r.ids + [pad] * (length - len(r.ids)) for r in rows]
        else:
            ids = [r.ids[:end[0]] for r in rows]
        sequences = torch.tensor(ids, dtype=input_ids.dtype, device=device)
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, cache=cache)
        return sequences

    return decode
