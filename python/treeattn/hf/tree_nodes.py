"""Token trees as :class:`~treeattn.hf.TreeCache` nodes for one forward: a chain of 1-token nodes after each
row's leaf (its first token, then a :class:`~treeattn.speculative.DraftTree`'s nodes, each a child of its draft
parent's), grown before the forward that writes their KV, and the accepted chain kept afterwards. The
speculative loop verifies draft trees this way, and the draft model catches up on accepted tokens this way."""

from __future__ import annotations

import torch

from ..speculative import ROOT, DraftTree


def grow_nodes(cache, leaves: list[int], trees: list[DraftTree], made: list[int]) -> list[list[int]]:
    """The cache nodes of one forward: for each row, its first token's node (a child of ``leaves[row]``) then
    one per node of ``trees[row]`` (a child of its draft parent's), each holding one appended slot. Every
    node made is added to ``made`` (so a caller can release them when something fails). Pages come through
    the cache (which evicts cached prefixes first when it has a prefix cache). Returns each row's nodes,
    ``[first, node 0, node 1, ...]``."""
    tree = cache.tree
    node_of: list[dict[int, int]] = []  # per row: draft node (ROOT: the first token) -> cache node
    for leaf in leaves:
        node_of.append({ROOT: tree.fork(leaf, 1)[0]})
        made.append(node_of[-1][ROOT])
    cache._pages(lambda: tree.append([n[ROOT] for n in node_of]))
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
        cache._pages(lambda: tree.append(grown))
    return [[nodes[i] for i in range(ROOT, draft.num_nodes)] for draft, nodes in zip(trees, node_of)]


def step_slots(tree, trees: list[DraftTree], nodes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the forward over :func:`grow_nodes`'s nodes writes each node's KV: ``(slots, take)``, ``take[j]``
    the forward row (node, row-major as ``nodes``) written to ``slots[j]``. A node's own slot, and every copy
    of it: a sibling that appended after its parent's page was claimed copied that page on write *before*
    this forward wrote the parent's KV, so the copy's slot must get it too (as each node's path reads it
    there)."""
    device = tree.device
    own = [int(tree.slots(n)[-1]) for row_nodes in nodes for n in row_nodes]
    pairs = {(slot, j) for j, slot in enumerate(own)}
    base = 0
    for draft, row_nodes in zip(trees, nodes):
        for i in range(draft.num_nodes):
            chain = [ROOT] + draft.path(i)  # the first token, then node i's draft ancestors and itself
            path = tree.path_slots(row_nodes[i + 1])[-len(chain):].tolist()
            pairs.update((slot, base + a + 1) for slot, a in zip(path, chain))
        base += draft.num_nodes + 1
    slots, take = zip(*sorted(pairs))
    return torch.tensor(slots, dtype=torch.int64, device=device), torch.tensor(take, dtype=torch.int64, device=device)


def keep_chain(tree, row_nodes: list[int], accepted: list[int], old_leaf: int) -> int:
    """Keep the chain of a row's first node and its ``accepted`` draft nodes (a root-to-node path of the draft
    tree) and return its last node, the row's new leaf; release every other node of the row's forward and
    the handles of the chain's inner nodes and of ``old_leaf`` (their tokens stay: the new leaf's path reads
    them)."""
    chain = [row_nodes[0]] + [row_nodes[i + 1] for i in accepted]
    keep = set(chain)
    for node in reversed(row_nodes):
        if node not in keep:
            tree.release(node)
    for node in [old_leaf, *chain[:-1]]:
        tree.release(node)
    return chain[-1]
