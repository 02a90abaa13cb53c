"""Draft trees from a small draft model: a beam-like top-k expansion by cumulative draft probability, one
draft-model call per depth for the whole frontier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._validate import check_int
from .tree import ROOT, DraftTree

NextLogits = Callable[[list[list[int]]], torch.Tensor]


def draft_model_tree(next_logits: NextLogits, num_speculative_tokens: int, *, top_k: int = 4,
                     max_depth: int | None = None, sample: bool = False, generator: torch.Generator | None = None,
                     to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DraftTree:
    """A draft tree of at most ``num_speculative_tokens`` nodes.

    ``next_logits(paths) -> [len(paths), vocab]``: the draft model's next-token logits after the last accepted
    token followed by each path (a list of token ids; ``[]`` is the root). The caller decodes those paths
    however it likes (e.g. the draft model over its own treeattn cache, one 1-token node per path element).
    ``to_probs``: turns those logits into the draft distribution (default: softmax in fp32), e.g. through the
    same logits processors as the target.

    Depth by depth, the frontier (at most ``top_k`` nodes, the best by cumulative draft probability) is scored
    in one ``next_logits`` call and grows children:

    - ``sample=False``: each frontier node's ``top_k`` most likely tokens are candidates, and the candidates
      with the highest cumulative probability are kept while the budget lasts. Proposals are deterministic
      (``draft_probs`` None): sampling verification then treats each child as a one-hot proposal, which
      keeps its output exact whatever rule chose the tree.
    - ``sample=True``: frontier nodes, best first, are given ``top_k`` children each (fewer when the budget or
      the draft distribution's support runs out) before anything is drawn, and the children are then drawn
      without replacement from the draft distribution (``generator``). Every drawn child is kept, so that
      ``verify_sampling``'s recursive rejection with ``draft_probs`` is exact.

    ``token_probs`` holds each node's draft probability; ``max_depth`` bounds the depth (default: the budget).
    """
    if not callable(next_logits):
        raise ValueError(f"next_logits: expected a callable paths -> logits, got {type(next_logits).__name__}")
    budget = check_int("num_speculative_tokens", num_speculative_tokens, 0)
    top_k = check_int("top_k", top_k, 1)
    max_depth = budget if max_depth is None else check_int("max_depth", max_depth, 0)
    if not isinstance(sample, bool):
        raise ValueError(f"sample: expected a bool, got {type(sample).__name__}")
    if to_probs is None:
        to_probs = _softmax

    tokens: list[int] = []
    parents: list[int] = []
    token_probs: list[float] = []
    paths: list[list[int]] = []
    cumulative: list[float] = []
    rows: dict[int, torch.Tensor] = {}  # node -> the draft distribution its children come from (ROOT included)
    frontier = [ROOT]
    depth = 0
    vocab = None
    while frontier and len(tokens) < budget and depth < max_depth:
        logits = next_logits([[] if f == ROOT else paths[f] for f in frontier])
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(frontier):
            got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"next_logits: expected a [{len(frontier)}, vocab] tensor (one row per path), got {got}")
        if vocab is not None and logits.shape[1] != vocab:
            raise ValueError(f"next_logits: expected vocab {vocab} as before, got {logits.shape[1]}")
        vocab = logits.shape[1]
        probs = to_probs(logits)
        for f, row in zip(frontier, probs):
            rows[f] = row
        remaining = budget - len(tokens)
        if sample:
            picks = _sampled_children(frontier, probs, top_k, remaining, generator)
        else:
            picks = _top_children(frontier, probs, cumulative, top_k, remaining)
        new_nodes = []
        for f, token, prob in picks:
            tokens.append(token)
            parents.append(f)
            token_probs.append(prob)
            paths.append(([] if f == ROOT else paths[f]) + [token])
            cumulative.append((1.0 if f == ROOT else cumulative[f]) * prob)
            new_nodes.append(len(tokens) - 1)
        # Stable sort: ties keep creation order, so the frontier is deterministic.
        frontier = sorted(new_nodes, key=lambda i: -cumulative[i])[:top_k]
        depth += 1

    draft_probs = None
    if sample and tokens:
        blank = torch.zeros(vocab, dtype=probs.dtype, device=probs.device)
        draft_probs = torch.stack([rows.get(i, blank) for i in range(ROOT, len(tokens))])
    return DraftTree(tokens, parents, draft_probs=draft_probs,
                     token_probs=torch.tensor(token_probs, dtype=torch.float32))


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _top_children(frontier: Sequence[int], probs: torch.Tensor, cumulative: Sequence[float], top_k: int,
                  remaining: int) -> list[tuple[int, int, float]]:
    """The best ``remaining`` of each frontier node's ``top_k`` tokens by cumulative probability, grouped by
    parent, siblings most likely first."""
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=-1)  # sorted, ties to the lower index
    values, indices = values.tolist(), indices.tolist()
    candidates = []
    for slot, f in enumerate(frontier):
        base = 1.0 if f == ROOT else cumulative[f]
        for r in range(k):
            if values[slot][r] > 0:
                candidates.append((-base * values[slot][r], slot, r))
    kept = sorted(sorted(candidates)[:remaining], key=lambda c: (c[1], c[2]))
    return [(frontier[slot], indices[slot][r], values[slot][r]) for _, slot, r in kept]


def _sampled_children(frontier: Sequence[int], probs: torch.Tensor, top_k: int, remaining: int,
                      generator: torch.Generator | None) -> list[tuple[int, int, float]]:
    """Children drawn without replacement from each frontier node's distribution. How many each node gets is
    fixed before any draw (frontier order, at most ``top_k``, within the support and the budget)."""
    support = (probs > 0).sum(dim=-1).tolist()
    picks = []
    for slot, f in enumerate(frontier):
        count = min(top_k, support[slot], remaining)
        if count <= 0:
            continue
        remaining -= count
        row = probs[slot]
        # Exponential race (q / Exp(1), largest first) is sampling without replacement, in draw order.
        race = row / torch.empty_like(row).exponential_(generator=generator)
        drawn = race.topk(count).indices.tolist()
        values = row[drawn].tolist()
        picks.extend((f, token, value) for token, value in zip(drawn, values))
    return picks
