"""The draft model of speculative decoding, decoded through treeattn over its own :class:`TreeCache`.

The draft model keeps each row's context in its own shared-prefix cache across steps: the prompts are
prefilled once; each step it first catches up on the tokens it has not seen (the target's bonus token, and
accepted draft tokens it never fed), as one chain of 1-token nodes per row in one forward, whose last logits
start the draft tree; then the tree grows depth by depth as tree nodes, one draft forward per depth for
every row's frontier (siblings share their context's pages, each reads its own path); fed nodes the finished
tree does not keep are released at once. Once the target has verified the tree, the accepted nodes the draft
model fed stay in its cache and the rest are released. So a step of depth ``d`` costs ``d`` draft forwards
(``d + 1`` when the last depth grown is not kept), whatever the context length.
"""

from __future__ import annotations

import torch

from ..speculative import ROOT, DraftTree, DraftTreeBuilder
from .adapter import attached
from .cache import TreeCache
from .tree_nodes import grow_nodes, keep_chain, step_slots


class DraftModelDrafter:
    """Draft trees of ``draft`` (a HF causal LM with the target's vocabulary) for the rows of one ``generate``
    call: ``num_speculative_tokens`` nodes, ``top_k`` children per frontier node, over a pool of
    ``num_pages`` pages of ``page_size`` tokens. Use it as a context manager: inside, the draft model runs its
    attention through its cache; on exit every page returns to the pool and the model is as it was.

    Rows are told apart by their batch index ``b``; ``real`` is a row's real tokens (prompt and emitted), of
    which the draft cache holds a prefix.
    """

    def __init__(self, draft, num_speculative_tokens: int, top_k: int, *, page_size: int, num_pages: int):
        self.draft, self.budget, self.top_k = draft, num_speculative_tokens, top_k
        self.cache = TreeCache(draft, page_size=page_size, num_pages=num_pages,
                               sized_by="treeattn.hf.generate's draft model pool")
        self.device = next(draft.parameters()).device
        self._leaf: dict[int, int] = {}  # row -> the draft cache node holding a prefix of its real tokens
        self._fed: dict[int, dict[int, int]] = {}  # row -> draft node fed this step -> its cache node
        self._attached = None

    def __enter__(self) -> DraftModelDrafter:
        self._attached = attached(self.draft, self.cache)
        self._attached.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        tree = self.cache.tree
        try:
            for node in tree.tree.live_ids():  # (the pool is this call's alone)
                tree.release(node)
        finally:
            self._attached.__exit__(*exc)

    @property
    def forward_passes(self) -> int:
        """Draft-model forwards so far (the prefill included)."""
        return self.cache.stats()["forward_passes"]

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The prompts ``input_ids [rows, length]`` (left-padded where ``mask`` is 0), each distinct row once."""
        ids = input_ids.to(self.device)
        if mask is None:
            positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        else:
            mask = mask.to(self.device)
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.draft(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
                   logits_to_keep=1)
        self._leaf = dict(enumerate(self.cache.rows))

    def trees(self, rows: list[tuple[int, list[int], int]]) -> list[DraftTree]:
        """One draft tree per ``(b, real, max_depth)`` (an empty one where ``max_depth <= 0``), after ``real``'s
        last token, grown together: ``d`` draft forwards for the deepest tree's depth ``d``."""
        builders = {b: DraftTreeBuilder(self.budget, top_k=self.top_k, max_depth=max(depth, 0))
                    for b, _, depth in rows}
        growing = [(b, real) for b, real, _ in rows if not builders[b].done]
        if growing:
            for (b, _), logits in zip(growing, self._catch_up(growing)):
                builders[b].grow(logits[None])
        while True:
            requests = [(b, f) for b, _ in growing for f in builders[b].frontier]
            if not requests:
                break
            logits = self._feed(builders, requests)
            start = 0
            for b, _ in growing:
                count = len(builders[b].frontier)
                if count:
                    builders[b].grow(logits[start:start + count])
                    start += count
        for b, _ in growing:
            self._keep_fed(b, builders[b].kept_nodes())
        return [builders[b].tree() for b, _, _ in rows]

    def _keep_fed(self, b: int, kept: list[int]) -> None:
        """Re-key row ``b``'s fed nodes by tree node (tree node ``i`` is builder node ``kept[i]``) and release
        the fed nodes the tree does not keep (no kept node descends from one)."""
        fed = self._fed.pop(b, {})
        self._fed[b] = {i: fed[n] for i, n in enumerate(kept) if n in fed}
        self._release(set(fed.values()) - set(self._fed[b].values()))

    def _release(self, nodes: set[int]) -> None:
        """Release draft cache ``nodes``, a set closed under descendants."""
        for node in sorted(nodes, reverse=True):  # (children before parents)
            self.cache.tree.release(node)

    def accepted(self, b: int, path: list[int]) -> None:
        """Row ``b``'s draft tree was verified and ``path`` (draft nodes, root to node) is kept: the longest
        prefix of it the draft model fed stays in its cache; every other node of the step is released."""
        fed = self._fed.pop(b, {})
        kept = []
        for node in path:
            if node not in fed:
                break
            kept.append(fed[node])
        self._release(set(fed.values()) - set(kept))
        tree = self.cache.tree
        if kept:
            for node in [self._leaf[b], *kept[:-1]]:
                tree.release(node)
            self._leaf[b] = kept[-1]

    # ---- forwards ----

    def _forward(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One decode forward of the cache's rows (set before): ``[len(tokens), vocab]`` fp32 logits."""
        out = self.draft(input_ids=torch.tensor(tokens, device=self.device)[:, None],
                         position_ids=torch.tensor(positions, device=self.device)[:, None], cache=self.cache,
                         use_cache=True)
        return out.logits[:, -1].float()

    def _catch_up(self, rows: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Feed each row the tokens of ``real`` its cache does not hold yet (at least its last token), as a
        chain of 1-token nodes, in one forward; each row's leaf moves to the chain's end. Returns the logits
        after each row's last token, ``[len(rows), vocab]``."""
        tree = self.cache.tree
        leaves = [self._leaf[b] for b, _ in rows]
        unseen = [real[tree.length(leaf):] for (_, real), leaf in zip(rows, leaves)]
        chains = [DraftTree.from_paths([tokens[1:]]) for tokens in unseen]
        made: list[int] = []
        try:
            nodes = grow_nodes(self.cache, leaves, chains, made)
        except BaseException:
            for node in reversed(made):
                tree.release(node)
            raise
        slots, take = step_slots(tree, chains, nodes)
        tokens = [t for chunk in unseen for t in chunk]
        positions = [tree.length(leaf) + i for leaf, chunk in zip(leaves, unseen) for i in range(len(chunk))]
        self.cache.set_rows([n for row_nodes in nodes for n in row_nodes], slots=slots, take=take)
        logits = self._forward(tokens, positions)
        for (b, _), row_nodes, chain in zip(rows, nodes, chains):
            self._leaf[b] = keep_chain(tree, row_nodes, list(range(chain.num_nodes)), self._leaf[b])
        ends = torch.tensor([len(chunk) for chunk in unseen]).cumsum(0) - 1
        return logits[ends.to(logits.device)]

    def _feed(self, builders: dict[int, DraftTreeBuilder], requests: list[tuple[int, int]]) -> torch.Tensor:
        """Feed frontier nodes ``(b, node)`` (each a child of a node fed before, or of the row's leaf) as new
        1-token nodes in one forward; returns their logits, ``[len(requests), vocab]``."""
        tree = self.cache.tree
        by_parent: dict[int, list[tuple[int, int]]] = {}  # parent cache node -> its (b, node) children
        for b, node in requests:
            parent = builders[b].parent(node)
            at = self._leaf[b] if parent == ROOT else self._fed[b][parent]
            by_parent.setdefault(at, []).append((b, node))
        rows: dict[tuple[int, int], int] = {}
        for at, kids in by_parent.items():
            for kid, made in zip(kids, tree.fork(at, len(kids))):
                rows[kid] = made
                self._fed.setdefault(kid[0], {})[kid[1]] = made
        leaves = [rows[r] for r in requests]
        positions = [tree.length(n) for n in leaves]
        self.cache.set_rows(leaves)
        return self._forward([builders[b].path_tokens(node)[-1] for b, node in requests], positions)
