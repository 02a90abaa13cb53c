"""NodeTree alone (no pool, no allocator: page lists are made up): nodes, paths, slots, release, node lookup
errors and the plan walk, through its public methods."""

from array import array

import numpy as np
import pytest
import torch

from treeattn.tree import NodeTree


def pages(*ids):
    return array("i", ids)


@pytest.fixture
def tree():
    """page_size 4. root 0: 6 tokens in pages 7, 3. kid 1 continues page 3 in place (2 tokens) and goes on in
    page 5 (1 token); kid 2 holds nothing yet; grandchild 3 of kid 1 copied page 5 into page 9 (1 token)."""
    t = NodeTree(page_size=4)
    root = t.add_root(6, pages(7, 3))
    kid, empty = t.fork(root, 2)
    t.grow(kid, [3, 5], 3)
    (grandchild,) = t.fork(kid, 1)
    t.grow(grandchild, [9], 1)
    assert [root.id, kid.id, empty.id, grandchild.id] == [0, 1, 2, 3]
    return t


def test_paths_and_slots(tree):
    kid, empty, grandchild = tree.node(1), tree.node(2), tree.node(3)
    assert tree.slots(kid).tolist() == [14, 15, 20]  # positions 6, 7 in page 3; 8 in page 5
    assert tree.path_pages(kid).tolist() == [7, 3, 5]
    assert tree.path_slots(kid).tolist() == [28, 29, 30, 31, 12, 13, 14, 15, 20]
    assert tree.path_pages(grandchild).tolist() == [7, 3, 9]  # its copy replaces page 5 on its path
    assert tree.slots(grandchild).tolist() == [37]
    assert tree.slots(empty).tolist() == []
    assert tree.path_slots(empty).tolist() == tree.path_slots(tree.node(0)).tolist()
    assert tree.grow_slots([kid, grandchild, empty], [[], [], [3]], 1).tolist() == [21, 38, 14]
    assert tree.grow_slots([kid, empty], [[], [3, 6]], 3).tolist() == [21, 22, 23, 14, 15, 24]
    assert tree.grow_slots([empty], [[]], 0).tolist() == [] and tree.slots(empty).tolist() == []  # (unchanged)
    assert tree.tail_page(empty) == 3 and tree.tail_page(grandchild) == 9


def test_release_keeps_released_ancestors_while_a_live_path_reads_them(tree):
    tree.release(tree.node(2))  # the empty kid: nothing of its own to give back
    # Kid 1 has a child that copied its last page (5): no live path reads page 5 any more. Kid 1 gives it up
    # and its token there (position 8) becomes the grandchild's, whose copy (page 9) holds it already.
    assert [(list(p), start) for p, start in tree.release(tree.node(1))] == [([5], 8)]
    with pytest.raises(ValueError, match="length: node 1 was released"):
        tree.node(1, "length")
    kid, grandchild = tree.any_node(1), tree.node(3)
    assert kid.released and 1 in tree and tree.live_ids() == [0, 3]
    assert (kid.start, kid.end, list(kid.pages)) == (6, 8, [3]) and (grandchild.start, grandchild.end) == (8, 10)
    assert tree.path_slots(grandchild).tolist() == [28, 29, 30, 31, 12, 13, 14, 15, 36, 37]
    assert tree.slots(grandchild).tolist() == [36, 37]
    removed = tree.release(tree.node(3))  # the grandchild, then kid 1 with it
    assert [(list(p), start) for p, start in removed] == [([9], 8), ([3], 6)]
    assert tree.node_ids() == [0] and not tree.node(0).children
    assert tree.counts() == {"nodes": 1, "live_nodes": 1, "leaves": 1, "tokens_stored": 6,
                             "tokens_if_unshared": 6, "pages_if_unshared": 2}


def test_release_splices_out_a_node_left_without_tokens():
    """A released node inside one page whose children all copied that page gives the page up, is left without
    tokens and leaves the tree: its children continue its parent, and the parent is checked in turn."""
    t = NodeTree(page_size=4)
    root = t.add_root(1, pages(4))
    (mid,) = t.fork(root, 1)
    t.grow(mid, [4], 1)  # in place in page 4: positions 1
    a, b = t.fork(mid, 2)
    t.grow(a, [6], 1)  # both copied page 4 (made-up decisions: the allocator would let the first continue)
    t.grow(b, [7], 1)
    assert t.release(root) == []  # mid reads page 4
    assert [(list(p), start) for p, start in t.release(mid)] == [([4], 1), ([4], 0)]  # mid's claim, then root's
    assert t.node_ids() == [a.id, b.id] and a.parent is None and (a.start, a.end) == (0, 3) == (b.start, b.end)
    assert t.path_pages(a).tolist() == [6] and t.slots(b).tolist() == [28, 29, 30]
    assert t.plan_walk([a, b]).parent == [-1, -1]
    walk = t.plan_walk([a, b], 3)
    assert walk.query_owner == [0, 0, 0, 1, 1, 1] and walk.start == [0, 0]


def test_counts(tree):
    assert tree.counts() == {"nodes": 4, "live_nodes": 4, "leaves": 2, "tokens_stored": 10,
                             "tokens_if_unshared": 6 + 10, "pages_if_unshared": 2 + 3}


def test_node_lookup_errors(tree):
    with pytest.raises(ValueError, match="fork: unknown node 99"):
        tree.node(99, "fork")
    for bad in (True, 1.0, "1", None):
        with pytest.raises(ValueError, match="expected a node"):
            tree.node(bad)
    assert tree.node(np.int64(2)).id == 2
    assert [n.id for n in tree.nodes(torch.tensor([3, 0]), "plan")] == [3, 0]
    assert [n.id for n in tree.nodes(np.array([1, 2]), "plan")] == [1, 2]
    for bad in ([1.0], [True], [[1]], torch.tensor([1.0]), torch.tensor([True]), np.array([1.5]), torch.tensor([[1]]),
                None, "01", 2.5):
        with pytest.raises(ValueError, match="plan: expected a node|nodes: expected"):
            tree.nodes(bad, "plan")
    with pytest.raises(ValueError, match="append: node 1 has children"):
        tree.check_growable([tree.node(1)], "append")
    with pytest.raises(ValueError, match="append: node 2 appears twice in leaves"):
        tree.check_growable([tree.node(2), tree.node(2)], "append")


def test_plan_walk(tree):
    """Queries on the grandchild and the empty kid: the empty kid's query belongs to the root (its owner), the
    walked subtree is the owners and their ancestors, in the order the queries reach them."""
    walk = tree.plan_walk(tree.nodes([3, 2], "plan"))
    assert walk.parent == [1, 2, -1] and walk.start == [9, 6, 0] and walk.end == [10, 9, 6]
    assert [list(p) for p in walk.pages] == [[9], [3, 5], [7, 3]]
    assert walk.query_owner == [0, 2] and walk.query_end == [10, 6] and not walk.reused
    two = tree.plan_walk(tree.nodes([1], "plan"), 2)  # causal over the kid's last 2 tokens
    assert two.query_end == [8, 9] and two.query_owner == [0, 0] and two.parent == [1, -1]
    assert tree.plan_walk(tree.nodes([1], "plan"), 2).reused
    assert not tree.plan_walk(tree.nodes([1], "plan"), 2, reuse=False).reused
