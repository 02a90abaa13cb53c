"""TreeKVCache on the shapes that stress its bookkeeping: a deep chain of 16k one-token nodes (a token tree, a
long search path) and a fork of 16k children. Memory is bounded with tracemalloc (host allocations: the
tree, its page lists, the numpy arrays of path queries); nothing here is timed."""

import tracemalloc

import numpy as np
import torch
from cache_model import live_path_pages

from treeattn import TreeKVCache

N = 16384
PAGE = 16


def _traced(call):
    """``call()``'s result and the peak host memory it allocated (bytes)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = call()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_deep_chain_path_queries_take_linear_memory():
    """Every node of the chain used to cache its whole path array: 977 MiB for one path_slots call at 16k
    nodes. Path queries now walk up and keep nothing: the peak is the answer's size, whatever the depth."""
    cache = TreeKVCache(1, 1, 16, page_size=PAGE, num_pages=N // PAGE + 1, dtype=torch.float32, device="cpu")
    chain = [cache.add(1)]

    def grow(n):
        for _ in range(n):
            (kid,) = cache.fork(chain[-1], 1)
            cache.append([kid])
            chain.append(kid)

    grow(N - 1 - 1024)
    _, built = _traced(lambda: grow(1024))  # the last 1024 nodes, at depth 15k: what a node costs down there
    assert built < 2048 * 1024, f"{built / 1024:.0f} bytes per node"
    leaf = chain[-1]
    slots, peak = _traced(lambda: cache.path_slots(leaf))
    assert slots.tolist() == list(range(N))  # one page after the other, filled in place
    assert peak < 64 * N, f"path_slots peaked at {peak} bytes for {N} tokens"
    _, peak = _traced(lambda: max(cache.path_slots(n).numel() for n in chain[:: N // 64]))  # nothing kept per node
    assert peak < 64 * N
    assert cache.stats()["pages_used"] == N // PAGE
    plan = cache.plan(chain[-3:], num_qo_heads=1)
    assert plan.stats["unique_tokens"] == N and plan.num_queries == 3
    for node in reversed(chain):  # released leaf first: the chain shrinks back, page by page
        cache.release(node)
    assert cache.stats()["pages_free"] == cache.num_pages and cache.stats()["nodes"] == 0


def test_wide_fork_takes_linear_memory():
    """A prompt forked into 16k children that each take one token: the tree, the plan and every path query
    stay linear in the number of children."""
    cache = TreeKVCache(1, 1, 16, page_size=PAGE, num_pages=N + 2, dtype=torch.float32, device="cpu")
    root = cache.add(2 * PAGE)

    def fork_and_grow():
        kids = cache.fork(root, N)
        cache.append(kids)
        return kids

    kids, built = _traced(fork_and_grow)
    assert built < 2048 * N, f"{built / N:.0f} bytes per child"
    cache.release(root)  # its two full pages stay: every child reads them
    assert cache.stats()["pages_used"] == N + 2 == len(live_path_pages(cache))
    plan, peak = _traced(lambda: cache.plan(kids, num_qo_heads=1))
    assert plan.stats["unique_tokens"] == 2 * PAGE + N and peak < 4096 * N
    _, peak = _traced(lambda: max(cache.path_slots(k).numel() for k in kids[:: N // 64]))
    assert peak < 64 * N
    assert np.array_equal(cache.path_slots(kids[5]).numpy(), np.r_[np.arange(2 * PAGE), (7 * PAGE)])
    for kid in kids:
        cache.release(kid)
    assert cache.stats()["pages_free"] == cache.num_pages and cache.stats()["nodes"] == 0
