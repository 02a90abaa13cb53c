"""Draft trees from a small draft model: a top-k expansion by cumulative draft probability that keeps the
best nodes over all depths (a confident draft gives a deep chain, an uncertain one a bushy tree), one
draft-model call per depth for the whole frontier (:class:`DraftTreeBuilder`, and :func:`draft_model_tree`
over a callable)."""

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
    token followed by each path (a list of token ids; ``[]`` is the root), called once per depth. The other
    arguments are :class:`DraftTreeBuilder`'s, which grows the tree (a driver that scores the frontiers of
    many trees in one forward uses it directly).
    """
    if not callable(next_logits):
        raise ValueError(f"next_logits: expected a callable paths -> logits, got {type(next_logits).__name__}")
    builder = DraftTreeBuilder(num_speculative_tokens, top_k=top_k, max_depth=max_depth, sample=sample,
                               generator=generator, to_probs=to_probs)
    while not builder.done:
        builder.grow(next_logits([builder.path_tokens(f) for f in builder.frontier]))
    return builder.tree()


class DraftTreeBuilder:
    """A draft-model tree grown one depth at a time: the caller scores :attr:`frontier` (the draft model's
    next-token logits after each frontier node's path) and passes them to :meth:`grow`, until :attr:`done`.

    Depth by depth, the frontier (at most ``top_k`` nodes of the last depth, the best by cumulative draft
    probability, the product of the draft probabilities along the path; first the root, ``ROOT``) grows
    children, and the tree keeps ``num_speculative_tokens`` nodes at most:

    - ``sample=False``: each frontier node's ``top_k`` most likely tokens are candidates, and the tree keeps
      the ``num_speculative_tokens`` candidates of all depths with the highest cumulative probability (ties
      to the earlier candidate, so a kept node's ancestors are kept). Only kept candidates join the frontier:
      a node outside the best ``num_speculative_tokens`` has no descendant inside them, so growth stops
      exactly when no deeper node can be kept. Candidates that were fed to the draft model (a frontier) but
      are not kept are not in :meth:`tree` (:meth:`kept_nodes` maps its nodes to the builder's). Proposals are
      deterministic (``draft_probs`` None): sampling verification then treats each child as a one-hot
      proposal, which keeps its output exact whatever rule chose the tree.
    - ``sample=True``: frontier nodes, best first, are given ``top_k`` children each (fewer when the budget or
      the draft distribution's support runs out) before anything is drawn, and the children are then drawn
      without replacement from the draft distribution (``generator``). Every drawn child is kept, so that
      ``verify_sampling``'s recursive rejection with ``draft_probs`` is exact.

    ``to_probs``: turns logits into the draft distribution (default: softmax in fp32), e.g. through the same
    logits processors as the target. ``max_depth`` bounds the depth (default: the budget). :meth:`tree`: the
    :class:`DraftTree`, ``token_probs`` holding each node's draft probability. One :meth:`grow` per depth, so
    a tree of depth ``d`` costs ``d`` draft-model calls (``sample=False``: sometimes ``d + 1``, when the last
    depth's candidates all fall outside the kept set).
    """

    def __init__(self, num_speculative_tokens: int, *, top_k: int = 4, max_depth: int | None = None,
                 sample: bool = False, generator: torch.Generator | None = None,
                 to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._budget = check_int("num_speculative_tokens", num_speculative_tokens, 0)
        self._top_k = check_int("top_k", top_k, 1)
        self._max_depth = self._budget if max_depth is None else check_int("max_depth", max_depth, 0)
        if not isinstance(sample, bool):
            raise ValueError(f"sample: expected a bool, got {type(sample).__name__}")
        self._sample, self._generator = sample, generator
        self._to_probs = _softmax if to_probs is None else to_probs
        self._tokens: list[int] = []
        self._parents: list[int] = []
        self._token_probs: list[float] = []
        self._paths: list[list[int]] = []
        self._cumulative: list[float] = []
        self._rows: dict[int, torch.Tensor] = {}  # node -> the draft distribution its children come from
        self._frontier = [ROOT] if self._budget else []
        self._kept: list[int] = []  # builder nodes of the tree, in creation order (parents first)
        self._depth = 0
        self._vocab: int | None = None

    @property
    def done(self) -> bool:
        full = self._sample and len(self._tokens) >= self._budget  # (deterministic candidates may outnumber it)
        return not self._frontier or full or self._depth >= self._max_depth

    @property
    def frontier(self) -> list[int]:
        """The nodes (``ROOT`` first) whose next-token logits :meth:`grow` takes, best first; ``[]`` when done."""
        return [] if self.done else list(self._frontier)

    def parent(self, node: int) -> int:
        return self._parents[node]

    def kept_nodes(self) -> list[int]:
        """The builder nodes :meth:`tree` holds, in its node order: ``tree()`` node ``i`` is builder node
        ``kept_nodes()[i]`` (the identity with ``sample=True``)."""
        return list(self._kept)

    def path_tokens(self, node: int) -> list[int]:
        """The tokens after the last accepted token down to ``node`` (``[]`` for ``ROOT``)."""
        return [] if node == ROOT else list(self._paths[node])

    def grow(self, logits: torch.Tensor) -> list[int]:
        """Grow the frontier's children from ``logits [len(frontier), vocab]`` (row ``i``: after frontier node
        ``i``'s path); returns the new nodes."""
        frontier = self.frontier
        if not frontier:
            raise RuntimeError("DraftTreeBuilder.grow: expected a tree still growing, got a finished one")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(frontier):
            got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"next_logits: expected a [{len(frontier)}, vocab] tensor (one row per path), got {got}")
        if self._vocab is not None and logits.shape[1] != self._vocab:
            raise ValueError(f"next_logits: expected vocab {self._vocab} as before, got {logits.shape[1]}")
        self._vocab = logits.shape[1]
        probs = self._to_probs(logits)
        for f, row in zip(frontier, probs):
            self._rows[f] = row
        if self._sample:
            picks = _sampled_children(frontier, probs, self._top_k, self._budget - len(self._tokens),
                                      self._generator)
        else:
            picks = _top_children(frontier, probs, self._top_k)
        new_nodes = []
        for f, token, prob in picks:
            self._tokens.append(token)
            self._parents.append(f)
            self._token_probs.append(prob)
            self._paths.append(self.path_tokens(f) + [token])
            self._cumulative.append((1.0 if f == ROOT else self._cumulative[f]) * prob)
            new_nodes.append(len(self._tokens) - 1)
        if self._sample:
            self._kept = list(range(len(self._tokens)))
            candidates = new_nodes
        else:
            # The best candidates by (cumulative probability, earlier first): a child never outranks its parent.
            best = sorted(range(len(self._tokens)), key=lambda i: -self._cumulative[i])[: self._budget]
            self._kept = sorted(best)
            kept = set(best)
            candidates = [i for i in new_nodes if i in kept]
        # Stable sort: ties keep creation order, so the frontier is deterministic.
        self._frontier = sorted(candidates, key=lambda i: -self._cumulative[i])[: self._top_k]
        self._depth += 1
        return new_nodes

    def tree(self) -> DraftTree:
        """The tree grown so far: the kept nodes (:meth:`kept_nodes`)."""
        draft_probs = None
        if self._sample and self._tokens:
            any_row = next(iter(self._rows.values()))
            blank = torch.zeros_like(any_row)
            draft_probs = torch.stack([self._rows.get(i, blank) for i in range(ROOT, len(self._tokens))])
        index = {ROOT: ROOT, **{node: i for i, node in enumerate(self._kept)}}
        return DraftTree([self._tokens[n] for n in self._kept], [index[self._parents[n]] for n in self._kept],
                         draft_probs=draft_probs,
                         token_probs=torch.tensor([self._token_probs[n] for n in self._kept], dtype=torch.float32))


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _top_children(frontier: Sequence[int], probs: torch.Tensor, top_k: int) -> list[tuple[int, int, float]]:
    """Each frontier node's ``top_k`` most likely tokens of nonzero probability, grouped by parent in frontier
    order, siblings most likely first."""
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=-1)  # sorted, ties to the lower index
    values, indices = values.tolist(), indices.tolist()
    return [(f, indices[slot][r], values[slot][r]) for slot, f in enumerate(frontier) for r in range(k)
            if values[slot][r] > 0]


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
