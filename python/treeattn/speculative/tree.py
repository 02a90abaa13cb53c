"""A draft token tree: the tokens a drafter proposes after a sequence's last accepted token, each a 1-token
node whose parent is an earlier node or the root (the last accepted token itself)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._validate import check_int

ROOT = -1


def _as_index_tensor(name: str, values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got dtype {values.dtype}")
        if values.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(values.shape)}")
        return values.detach().to(device="cpu", dtype=torch.int64).contiguous()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise ValueError(f"{name}: expected a 1-D integer tensor or a sequence of ints, got {type(values).__name__}")
    return torch.tensor([check_int(f"{name}[{i}]", v, -(2**62)) for i, v in enumerate(values)], dtype=torch.int64)


@dataclass(frozen=True, eq=False)
class DraftTree:
    """Draft tokens of one sequence as a tree of 1-token nodes, in topological order.

    ``tokens: [n]`` int64 token ids; ``parents: [n]`` int64 with ``parents[i] < i``, ``-1`` (``ROOT``) meaning
    the sequence's last accepted token. Siblings carry distinct tokens and are listed in proposal order (the
    order in which sampling verification tries them).

    ``draft_probs: [n + 1, vocab]`` or None says how the children were proposed. None: deterministically (a
    proposal independent of the target's randomness, e.g. n-gram lookups or a draft model's top-k); row
    ``0`` is the distribution the root's children were drawn from, row ``i + 1`` node ``i``'s: the children
    of each node were sampled without replacement from that row, in sibling order. ``token_probs: [n]`` or
    None: the draft probability of each node's token given its parent (for ranking and statistics).

    A target verifies the tree in one forward: node ``i`` attends to the shared context plus the nodes of
    ``path(i)`` (``ancestor_mask()``), at position ``last position + depth[i]``.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None
    token_probs: torch.Tensor | None = None
    _children: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    _depth: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        tokens = _as_index_tensor("tokens", self.tokens)
        parents = _as_index_tensor("parents", self.parents)
        n = tokens.numel()
        if parents.numel() != n:
            raise ValueError(f"parents: expected {n} entries (one per token), got {parents.numel()}")
        if n and int(tokens.min()) < 0:
            raise ValueError(f"tokens: expected token ids >= 0, got {int(tokens.min())}")
        children: list[list[int]] = [[] for _ in range(n + 1)]
        depth = [0] * n
        parent_list = parents.tolist()
        token_list = tokens.tolist()
        for i, p in enumerate(parent_list):
            if not ROOT <= p < i:
                raise ValueError(f"parents[{i}]: expected a parent in [-1, {i - 1}] (earlier node or root), got {p}")
            siblings = children[p + 1]
            if any(token_list[s] == token_list[i] for s in siblings):
                raise ValueError(f"tokens[{i}]: expected distinct tokens among siblings, got {token_list[i]} twice "
                                 f"under parent {p}")
            siblings.append(i)
            depth[i] = 1 if p == ROOT else depth[p] + 1
        if self.draft_probs is not None:
            probs = self.draft_probs
            if not isinstance(probs, torch.Tensor) or not probs.dtype.is_floating_point or probs.dim() != 2:
                got = (f"shape {list(probs.shape)} dtype {probs.dtype}" if isinstance(probs, torch.Tensor)
                       else type(probs).__name__)
                raise ValueError(f"draft_probs: expected a 2-D floating tensor [n + 1, vocab], got {got}")
            if probs.shape[0] != n + 1:
                raise ValueError(f"draft_probs: expected {n + 1} rows (root + one per node), got {probs.shape[0]}")
            if n and int(tokens.max()) >= probs.shape[1]:
                raise ValueError(
                    f"tokens: expected ids < vocab {probs.shape[1]} of draft_probs, got {int(tokens.max())}"
                )
            if n:
                # Each child was drawn from its parent's row, so it has positive probability there.
                drawn = probs[(parents + 1).to(probs.device), tokens.to(probs.device)]
                bad = torch.nonzero(~(drawn > 0)).flatten().tolist()
                if bad:
                    i = bad[0]
                    raise ValueError(f"draft_probs: expected a positive probability for node {i}'s token "
                                     f"{token_list[i]} in its parent's row, got {float(drawn[i])}")
        if self.token_probs is not None:
            tp = self.token_probs
            if not isinstance(tp, torch.Tensor) or tp.dim() != 1 or tp.numel() != n:
                got = f"shape {list(tp.shape)}" if isinstance(tp, torch.Tensor) else type(tp).__name__
                raise ValueError(f"token_probs: expected a 1-D tensor of {n} entries, got {got}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "_children", tuple(tuple(c) for c in children))
        object.__setattr__(self, "_depth", torch.tensor(depth, dtype=torch.int64))

    # construction -----------------------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> DraftTree:
        return cls(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], max_nodes: int | None = None) -> DraftTree:
        """The trie of ``paths`` (token lists after the root), breadth-first so that shallower nodes come
        first; siblings in the order their first path lists them. ``max_nodes`` keeps the first nodes of
        that order (a connected tree, since parents precede children). A chain is ``from_paths([tokens])``."""
        if max_nodes is not None:
            max_nodes = check_int("max_nodes", max_nodes, 0)
        trie: dict[tuple[int, ...], None] = {}
        for path_index, path in enumerate(paths):
            prefix: tuple[int, ...] = ()
            for j, token in enumerate(path):
                prefix = prefix + (check_int(f"paths[{path_index}][{j}]", token, 0),)
                trie.setdefault(prefix, None)
        order = sorted(trie, key=len)  # stable: equal depths keep first-seen order
        if max_nodes is not None:
            order = order[:max_nodes]
        index = {prefix: i for i, prefix in enumerate(order)}
        tokens = [prefix[-1] for prefix in order]
        parents = [index[prefix[:-1]] if len(prefix) > 1 else ROOT for prefix in order]
        return cls(tokens, parents)

    # structure --------------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.tokens.numel()

    def __len__(self) -> int:
        return self.num_nodes

    @property
    def depth(self) -> torch.Tensor:
        """``[n]`` int64: 1 for the root's children; node ``i`` sits at position ``last position + depth[i]``."""
        return self._depth

    @property
    def max_depth(self) -> int:
        return int(self._depth.max()) if self.num_nodes else 0

    def children(self, node: int) -> tuple[int, ...]:
        """The children of ``node`` (``ROOT`` for the root) in proposal order."""
        node = check_int("node", node, ROOT, self.num_nodes - 1)
        return self._children[node + 1]

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (inclusive); ``[]`` for ``ROOT``."""
        node = check_int("node", node, ROOT, self.num_nodes - 1)
        parents = self.parents.tolist()
        out = []
        while node != ROOT:
            out.append(node)
            node = parents[node]
        return out[::-1]

    def path_tokens(self, node: int) -> list[int]:
        """The tokens that ``node``'s position follows the last accepted token with, ``node``'s included."""
        tokens = self.tokens.tolist()
        return [tokens[i] for i in self.path(node)]

    def ancestor_mask(self) -> torch.Tensor:
        """``[n, n]`` bool: ``mask[i, j]`` is True when node ``j`` is ``i`` or one of its ancestors, i.e. the
        draft tokens query ``i`` attends to besides the shared context (a tree-attention mask)."""
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        parents = self.parents.tolist()
        for i, p in enumerate(parents):
            if p != ROOT:
                mask[i] |= mask[p]  # parents precede children, so the parent's row is complete
        return mask

    def leaves(self) -> list[int]:
        return [i for i in range(self.num_nodes) if not self._children[i + 1]]
