"""Verifying a draft tree against the target's distributions at every node, in one pass down the tree.

Both rules read one target row per position: ``target: [n + 1, vocab]``, row ``0`` the target's next-token
scores after the last accepted token (the root), row ``i + 1`` those after draft node ``i`` (its path
appended). Rows are the *processed* scores: each row through the caller's logits processors (and warpers,
for sampling) with its own prefix, the context plus ``tree.path_tokens(i)``, exactly as plain decoding would
process that position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tree import ROOT, DraftTree


@dataclass(frozen=True)
class Verification:
    """What one verification step accepted.

    ``path``: accepted node indices, root to leaf. ``tokens: [len(path) + 1]`` int64: the accepted draft tokens
    followed by the target's own next token (the bonus token), i.e. every token this step emits.
    ``draft_tokens``: nodes in the tree; ``accepted_draft_tokens``: ``len(path)``.
    """

    path: list[int]
    tokens: torch.Tensor
    draft_tokens: int
    accepted_draft_tokens: int


def _check_target(name: str, tree: DraftTree, target) -> torch.Tensor:
    if not isinstance(target, torch.Tensor) or not target.dtype.is_floating_point or target.dim() != 2:
        got = (f"shape {list(target.shape)} dtype {target.dtype}" if isinstance(target, torch.Tensor)
               else type(target).__name__)
        raise ValueError(f"{name}: expected a 2-D floating tensor [num_nodes + 1, vocab], got {got}")
    if target.shape[0] != tree.num_nodes + 1:
        raise ValueError(f"{name}: expected {tree.num_nodes + 1} rows (root + one per node), got {target.shape[0]}")
    if tree.num_nodes and int(tree.tokens.max()) >= target.shape[1]:
        raise ValueError(f"{name}: expected vocab > {int(tree.tokens.max())} (the largest draft token), "
                         f"got {target.shape[1]}")
    return target


def _result(tree: DraftTree, path: list[int], bonus: int) -> Verification:
    tokens = tree.tokens[path].tolist() + [bonus]
    return Verification(path, torch.tensor(tokens, dtype=torch.int64), tree.num_nodes, len(path))


def verify_greedy(tree: DraftTree, target_scores: torch.Tensor) -> Verification:
    """Accept the longest path whose every token is the target's argmax at its position, then the target's
    argmax after it (ties go to the lowest token id, as ``torch.argmax`` in greedy decoding).

    ``target_scores: [n + 1, vocab]`` processed logits (or log-probabilities), any device.
    """
    _check_target("target_scores", tree, target_scores)
    return _greedy_walk(tree, target_scores.argmax(dim=-1).tolist())


def verify_greedy_batch(trees: Sequence[DraftTree], target_scores: torch.Tensor) -> list[Verification]:
    """``verify_greedy`` for a batch of trees whose rows are stacked: ``target_scores: [sum(n_b + 1), vocab]``,
    tree ``b``'s ``n_b + 1`` rows after those of the trees before it. One argmax and one device-to-host copy
    for the whole batch."""
    if not isinstance(target_scores, torch.Tensor) or target_scores.dim() != 2:
        got = (f"shape {list(target_scores.shape)}" if isinstance(target_scores, torch.Tensor)
               else type(target_scores).__name__)
        raise ValueError(f"target_scores: expected a 2-D tensor [sum(num_nodes + 1), vocab], got {got}")
    sizes = [tree.num_nodes + 1 for tree in trees]
    if sum(sizes) != target_scores.shape[0]:
        raise ValueError(
            f"target_scores: expected {sum(sizes)} rows (num_nodes + 1 per tree), got {target_scores.shape[0]}"
        )
    for b, rows in enumerate(target_scores.split(sizes)):
        _check_target(f"target_scores (tree {b})", trees[b], rows)
    best = target_scores.argmax(dim=-1).tolist()
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return [_greedy_walk(tree, best[start:start + size]) for tree, start, size in zip(trees, starts, sizes)]


def _greedy_walk(tree: DraftTree, best: list[int]) -> Verification:
    """The walk down ``tree`` given the target's argmax per row (``best: [n + 1]``)."""
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = ROOT
    while True:
        want = best[node + 1]
        nxt = next((c for c in tree.children(node) if tokens[c] == want), None)
        if nxt is None:
            return _result(tree, path, want)
        path.append(nxt)
        node = nxt


def verify_sampling(tree: DraftTree, target_probs: torch.Tensor, *, generator: torch.Generator | None = None
                    ) -> Verification:
    """Tree speculative sampling: the emitted tokens are distributed exactly as sampling them one by one from
    the target.

    ``target_probs: [n + 1, vocab]`` processed probabilities (after the logits processors and warpers; rows
    sum to 1). ``generator``: the source of randomness, on ``target_probs``' device.

    At each accepted node the children are tried in sibling order. A child ``x`` drawn from ``q`` is accepted
    with probability ``min(1, p(x) / q(x))``; on rejection the target becomes ``norm(max(p - q, 0))`` and
    (the children being drawn without replacement) ``q`` loses ``x``. Deterministic proposals
    (``tree.draft_probs`` None) are the one-hot case: ``x`` is accepted with probability ``p(x)``, else
    ``p(x)`` is set to 0 and ``p`` renormalised. When no child is accepted, or the node is a leaf, the bonus
    token is sampled from what is left of ``p``.
    """
    _check_target("target_probs", tree, target_probs)
    probs = target_probs.float() if target_probs.dtype != torch.float64 else target_probs
    draft = tree.draft_probs
    if draft is not None:
        if draft.shape[1] != probs.shape[1]:
            raise ValueError(f"target_probs: expected vocab {draft.shape[1]} (as draft_probs), got {probs.shape[1]}")
        draft = draft.to(device=probs.device, dtype=probs.dtype)
    tokens = tree.tokens.tolist()
    device = probs.device
    path: list[int] = []
    node = ROOT
    while True:
        p = probs[node + 1]
        children = tree.children(node)
        if not children:
            break
        # One uniform per sibling, drawn up front: the comparisons then read them without extra launches.
        uniforms = torch.rand(len(children), generator=generator, device=device, dtype=probs.dtype).tolist()
        q = None if draft is None else draft[node + 1]
        accepted = None
        for child, u in zip(children, uniforms):
            x = tokens[child]
            px = float(p[x])
            qx = 1.0 if q is None else float(q[x])
            if qx > 0 and u * qx < px:  # u < min(1, p/q) without dividing
                accepted = child
                break
            p = _residual(p, q, x)
            if q is not None:
                q = q.clone()
                q[x] = 0
                q = q / q.sum().clamp_min(torch.finfo(q.dtype).tiny)
        if accepted is None:
            break
        path.append(accepted)
        node = accepted
    bonus = int(torch.multinomial(p, 1, generator=generator))
    return _result(tree, path, bonus)


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """``norm(max(p - q, 0))`` after rejecting ``x`` (``q`` None: one-hot at ``x``)."""
    if q is None:
        residual = p.clone()
        residual[x] = 0
    else:
        residual = (p - q).clamp_min(0)
    total = residual.sum()
    if float(total) <= 0:
        # p <= q everywhere and both sum to 1 means p == q, where no draw is ever rejected: only rounding gets
        # here, and the target without x is then the right distribution.
        residual = p.clone()
        residual[x] = 0
        total = residual.sum()
    return residual / total
