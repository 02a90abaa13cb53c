"""Fixed-capacity plans: re-planning a new tree into the same buffers (CUDA-graph replay over trees that
change every step). Padding items and merge entries must be no-ops."""

import pytest
import torch

import treeattn
from treeattn.testing import assert_close, check_decode, poisoned_cache, tree_table

HEADS = {"num_qo_heads": 8, "num_kv_heads": 2}


def _step_inputs(table, device, dtype=torch.float32, heads=(8, 2), head_dim=64):
    q = torch.randn(table.num_queries, heads[0], head_dim, device=device, dtype=dtype)
    k = poisoned_cache(table, (heads[1], head_dim), dtype, device)
    v = poisoned_cache(table, (heads[1], head_dim), dtype, device)
    return q, k, v


def test_padded_plan_matches_exact_plan(device):
    table = tree_table([70, 20, 5], [1, 3, 2], 16).to(device)
    exact = table.plan(num_sms=2, **HEADS)
    cap = treeattn.PlanCapacity.of(exact, headroom=2.0)
    padded = table.plan(num_sms=2, capacity=cap, **HEADS)
    assert padded.item_page_ptr.shape[0] == cap.items > exact.num_items
    assert padded.merge_query.shape[0] == cap.merge_queries
    step = check_decode(table, 8, 64, torch.float32, device, num_kv_heads=2, plan=padded, lse_tol=1e-6)
    assert torch.equal(step.out, treeattn.tree_decode(step.q, *step.caches, exact))


def test_update_replans_a_different_tree_in_place(device):
    first = tree_table([64, 16], [1, 6], 16).to(device)
    # Same number of queries, another shape: a deeper tree, with shuffled page ids of its own.
    second = tree_table([30, 40, 9], [1, 2, 3], 16).to(device)
    cap = treeattn.PlanCapacity(items=64, rows=128, partial_rows=64, merge_queries=6, nnz=64)
    # The pool holds both steps' pages: the plan's page bound is the pool's.
    plan = first.plan(capacity=cap, num_sms=2, num_pages=max(first.num_pages, second.num_pages), **HEADS)
    buffers = [t.data_ptr() for t in plan.tensor_args()]
    q, k, v = _step_inputs(first, device)
    out = torch.empty_like(q)
    treeattn.tree_decode(q, k, v, plan, out=out)
    assert_close(out, first.reference(q, k, v)[0])

    plan.update_(second.kv_indptr, second.kv_indices, second.kv_last_page_len)
    assert [t.data_ptr() for t in plan.tensor_args()] == buffers, "update_ must refill, not reallocate"
    assert plan.stats["unique_tokens"] == len({s for i in range(6) for s in second.token_slots(i).tolist()})
    q2, k2, v2 = _step_inputs(second, device)
    out2, lse2 = treeattn.tree_decode(q2, k2, v2, plan, out=out, return_lse=True)
    o_ref, lse_ref = second.reference(q2, k2, v2)
    assert_close(out2, o_ref)
    assert_close(lse2, lse_ref, 1e-6, "lse")


def test_update_errors_leave_the_plan_unchanged(device):
    table = tree_table([32, 16], [1, 4], 16).to(device)
    # No pool bound (num_pages=None): the refills below fail on the capacity, not on page ids.
    plan = table.plan(capacity=treeattn.PlanCapacity.of(table.plan(**HEADS)), num_pages=None, **HEADS)
    before = [t.clone() for t in plan.tensor_args()]
    bigger = tree_table([64, 48], [1, 4], 16).to(device)
    with pytest.raises(ValueError, match=r"capacity: expected this step's .* <= capacity\.\w+=\d+, got \d+"):
        plan.update_(bigger.kv_indptr, bigger.kv_indices, bigger.kv_last_page_len)
    other_n = tree_table([32, 16], [1, 5], 16).to(device)
    with pytest.raises(ValueError, match=r"kv_last_page_len: expected 4 queries \(the captured plan's\), got 5"):
        plan.update_(other_n.kv_indptr, other_n.kv_indices, other_n.kv_last_page_len)
    assert all(torch.equal(a, b) for a, b in zip(before, plan.tensor_args()))
    with pytest.raises(ValueError, match=r"plan: expected a plan built with capacity=PlanCapacity\(\.\.\.\) to refill"):
        table.plan(**HEADS).update_(table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    with pytest.raises(ValueError, match=r"capacity: expected this step's items <= capacity.items=1"):
        table.plan(**HEADS, capacity=treeattn.PlanCapacity(items=1, rows=64, partial_rows=64, merge_queries=8, nnz=64))


@pytest.mark.gpu
def test_cuda_graph_replays_changing_trees():
    """Capture one decode step once; every later step re-plans its own tree into the captured buffers."""
    device = torch.device("cuda")
    tables = [tree_table(levels, fanout, 16) for levels, fanout in
              [([512, 64], [1, 8]), ([256, 128, 32], [1, 2, 4]), ([0, 300], [1, 8]), ([700, 1, 1], [1, 4, 2])]]
    num_pages = max(t.num_pages for t in tables)
    k = torch.randn(num_pages, 16, 8, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(8, 32, 128, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    first = tables[0].to(device)
    probe = first.plan(num_qo_heads=32, num_kv_heads=8, num_pages=num_pages)
    cap = treeattn.PlanCapacity(items=4 * probe.num_items + 64, rows=1024, partial_rows=1024, merge_queries=8, nnz=2048)
    plan = first.plan(num_qo_heads=32, num_kv_heads=8, num_pages=num_pages, capacity=cap)
    treeattn.tree_decode(q, k, v, plan, out=out)  # compile + workspace before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        treeattn.tree_decode(q, k, v, plan, out=out)
    for table in tables[1:] + tables[:1]:
        table = table.to(device)
        plan.update_(table.kv_indptr, table.kv_indices, table.kv_last_page_len)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, table.reference(q, k, v)[0])


def _cache_step_reference(cache, leaves, q, layer=0):
    """Reference attention of each leaf's query over its whole path, from the cache's pool."""
    k_cache, v_cache = cache.layer(layer).values()
    outs = []
    for i, leaf in enumerate(leaves):
        slots = cache.path_slots(leaf)
        indptr = torch.tensor([0, slots.numel()], dtype=torch.int32)
        o, _ = treeattn.reference.tree_decode(
            q[i : i + 1], k_cache.reshape(-1, 1, *k_cache.shape[2:]), v_cache.reshape(-1, 1, *v_cache.shape[2:]),
            indptr, slots.to(torch.int32).cpu(), torch.ones(1, dtype=torch.int32))
        outs.append(o)
    return torch.cat(outs)


def test_cache_plan_into_refills_a_capacity_plan(device):
    """A decode loop over a TreeKVCache whose tree changes every step, re-planned into one plan's buffers."""
    cache = treeattn.TreeKVCache(1, 2, 64, page_size=16, num_pages=64, dtype=torch.float32, device=device)
    root = cache.add(40)
    cache.write(0, cache.slots(root), torch.randn(40, 2, 64, device=device), torch.randn(40, 2, 64, device=device))
    leaves = cache.fork(root, 4)
    cap = treeattn.PlanCapacity(items=64, rows=128, partial_rows=128, merge_queries=4, nnz=64)
    plan = None
    for step in range(6):
        slots = cache.append(leaves)
        cache.write(0, slots, torch.randn(4, 2, 64, device=device), torch.randn(4, 2, 64, device=device))
        if step == 3:  # the tree changes shape: one branch forks in two, another dies
            kids = cache.fork(leaves[0], 2)
            cache.release(leaves[3])
            leaves = kids + leaves[1:3]
            slots = cache.append(leaves)
            cache.write(0, slots, torch.randn(4, 2, 64, device=device), torch.randn(4, 2, 64, device=device))
        if plan is None:
            plan = cache.plan(leaves, num_qo_heads=8, capacity=cap)
            buffers = [t.data_ptr() for t in plan.tensor_args()]
        else:
            assert cache.plan(leaves, num_qo_heads=8, into=plan) is plan
            assert [t.data_ptr() for t in plan.tensor_args()] == buffers
        q = torch.randn(4, 8, 64, device=device)
        o = treeattn.tree_decode(q, **cache.layer(0), plan=plan)
        assert_close(o, _cache_step_reference(cache, leaves, q))
    with pytest.raises(ValueError, match=r"plan: expected a plan made by treeattn.plan\(\.\.\.\) for update_"):
        plan.update_(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)
