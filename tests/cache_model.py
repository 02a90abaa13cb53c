"""Shared by the TreeKVCache tests: a plain model of the cache (one token list per node), NaN poisoning, and
checks of the cache's public state (the front's methods, its node tree and its page allocator).

Caches here are tiny (2 layers, 2 KV heads, head_dim 16: the smallest GPU-legal tl.dot width) and poisoned
with NaN, so a stray read of a slot no path holds shows up; token values are fresh random rows per token.
"""

from __future__ import annotations

import numpy as np
import torch

from treeattn import TreeKVCache

LAYERS, HKV, HQ, DIM = 2, 2, 4, 16
DTYPE = torch.float32


def pool_views(cache: TreeKVCache, i: int) -> list[torch.Tensor]:
    """Layer ``i``'s pool tensors (K and V, or MLA's latent rows), without the FP8 scales."""
    return [view for name, view in cache.layer(i).items() if name.endswith("_cache")]


def poison(cache: TreeKVCache) -> TreeKVCache:
    """Fill every layer of the pool with NaN."""
    for i in range(cache.num_layers):
        for view in pool_views(cache, i):
            view.fill_(float("nan"))
    return cache


def make_cache(page_size=4, num_pages=32, **kw) -> TreeKVCache:
    return poison(
        TreeKVCache(LAYERS, HKV, DIM, page_size=page_size, num_pages=num_pages, dtype=DTYPE, device="cpu", **kw)
    )


class Model:
    """The plain model: each node's whole token sequence (ids), the tree, and every token's K/V rows."""

    def __init__(self):
        self.seq: dict[int, list[int]] = {}
        self.parent: dict[int, int | None] = {}
        self.children: dict[int, set[int]] = {}
        self.live: set[int] = set()
        self.released: set[int] = set()
        self.k: list[torch.Tensor] = []  # token id -> [LAYERS, HKV, DIM]
        self.v: list[torch.Tensor] = []

    def new_tokens(self, n):
        first = len(self.k)
        for _ in range(n):
            self.k.append(torch.randn(LAYERS, HKV, DIM))
            self.v.append(torch.randn(LAYERS, HKV, DIM))
        return list(range(first, first + n))

    def add_node(self, node, parent, seq):
        self.seq[node], self.parent[node], self.children[node] = seq, parent, set()
        self.live.add(node)
        if parent is not None:
            self.children[parent].add(node)

    def leaves(self):
        return sorted(n for n in self.live if not self.children[n])

    def release(self, node):
        self.live.discard(node)
        self.released.add(node)
        while node is not None and node not in self.live and not self.children[node]:
            parent = self.parent.pop(node)
            del self.seq[node], self.children[node]
            if parent is not None:
                self.children[parent].discard(node)
            node = parent

    def own_range(self, node):
        parent = self.parent[node]
        return (0 if parent is None else len(self.seq[parent])), len(self.seq[node])

    def rows(self, ids, layer):
        if not ids:
            return torch.zeros(0, HKV, DIM), torch.zeros(0, HKV, DIM)
        return torch.stack([self.k[t][layer] for t in ids]), torch.stack([self.v[t][layer] for t in ids])


def write(cache, model, slots, ids):
    for layer in range(LAYERS):
        k, v = model.rows(ids, layer)
        cache.write(layer, slots, k, v)


def snapshot(cache: TreeKVCache):
    """Everything public about the cache: stats, every live node as the front answers for it, every node of
    the tree (released internal ones too), every page's count and fill, the free list, and the pool."""
    tree, pages = cache.tree, cache.allocator
    live = {
        n: (cache.length(n), cache.parent(n), cache.slots(n).tolist(), cache.path_slots(n).tolist())
        for n in tree.live_ids()
    }
    nodes = {}
    for n in tree.node_ids():
        x = tree.any_node(n)
        parent = None if x.parent is None else x.parent.id
        nodes[n] = (x.start, x.end, list(x.pages), x.released, sorted(x.children), parent)
    books = [(pages.refcount(p), pages.fill(p)) for p in range(cache.num_pages)]
    pool = [t.clone() for i in range(cache.num_layers) for t in pool_views(cache, i)]
    return cache.stats(), live, nodes, books, pages.free_pages(), pool


def assert_unchanged(cache: TreeKVCache, before) -> None:
    now = snapshot(cache)
    for a, b, what in zip(now[:5], before[:5], ("stats", "live nodes", "tree", "page books", "free list")):
        assert a == b, what
    for a, b in zip(now[5], before[5]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_books(cache: TreeKVCache, model: Model | None = None) -> None:
    """Reference counts, fills and the free list agree with the tree's page lists; stats agree with the model."""
    tree, pages = cache.tree, cache.allocator
    refs = np.zeros(cache.num_pages, dtype=np.int64)
    for n in tree.node_ids():
        for p in tree.any_node(n).pages:
            refs[p] += 1
    assert refs.tolist() == [pages.refcount(p) for p in range(cache.num_pages)]
    free = pages.free_pages()
    assert len(set(free)) == len(free), "a page is on the free list twice"
    assert set(free) == set(np.nonzero(refs == 0)[0].tolist())
    fills = [pages.fill(p) for p in range(cache.num_pages)]
    assert all(f == 0 for f, r in zip(fills, refs) if r == 0) and max(fills) <= cache.page_size
    stats = cache.stats()
    assert stats["pages_used"] + stats["pages_free"] == cache.num_pages == stats["num_pages"]
    assert stats["pages_used"] == int((refs > 0).sum())
    assert stats["pages_used"] == len(live_path_pages(cache)), "a page no live path reads is still held"
    assert stats["tokens_stored"] == sum(x.end - x.start for x in map(tree.any_node, tree.node_ids()))
    if model is None:
        return
    # The cache keeps a released node only while a live path reads a page through it; the model keeps every
    # released node that has live descendants.
    assert set(tree.live_ids()) <= set(tree.node_ids()) <= set(model.seq)
    assert tree.live_ids() == sorted(model.live)
    leaves = model.leaves()
    assert stats["live_nodes"] == len(model.live)
    assert stats["leaves"] == len(leaves)
    assert stats["tokens_if_unshared"] == sum(len(model.seq[n]) for n in leaves)
    assert stats["tokens_stored"] >= len({t for n in model.live for t in model.seq[n]})


def live_path_pages(cache: TreeKVCache) -> set[int]:
    """The distinct pages the live nodes' paths read (from their public path slots): what the pool must hold."""
    return {int(p) for n in cache.tree.live_ids() for p in (cache.path_slots(n) // cache.page_size).unique()}


def check_pool(cache: TreeKVCache, model: Model) -> None:
    """Every live node's path, gathered from the pool, is its model sequence (every layer, K and V)."""
    for node in sorted(model.live):
        slots = cache.path_slots(node)
        ids = model.seq[node]
        assert slots.dtype == torch.int64
        assert cache.length(node) == len(ids) == slots.shape[0]
        # A node's own slots end its path; they hold at least the tokens appended to it (more once released
        # ancestors gave their last partial page's tokens to its copy of that page).
        own = cache.slots(node).tolist()
        assert own == slots[len(slots) - len(own):].tolist()
        begin, end = model.own_range(node)
        assert len(own) >= end - begin
        for layer in range(LAYERS):
            k_cache, v_cache = pool_views(cache, layer)
            k, v = model.rows(ids, layer)
            assert torch.equal(k_cache.reshape(-1, HKV, DIM)[slots], k)
            assert torch.equal(v_cache.reshape(-1, HKV, DIM)[slots], v)
