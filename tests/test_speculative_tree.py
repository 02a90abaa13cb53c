"""DraftTree: validation, structure helpers against brute force over random trees."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treeattn.speculative import ROOT, DraftTree


@st.composite
def trees(draw, max_nodes=12, vocab=6):
    n = draw(st.integers(0, max_nodes))
    tokens, parents = [], []
    used: dict[int, set[int]] = {}
    for i in range(n):
        parent = draw(st.integers(ROOT, i - 1))
        free = [t for t in range(vocab) if t not in used.setdefault(parent, set())]
        if not free:
            parent = ROOT if i == 0 else i - 1
            free = [t for t in range(vocab) if t not in used.setdefault(parent, set())]
        token = draw(st.sampled_from(free))
        used[parent].add(token)
        tokens.append(token)
        parents.append(parent)
    return DraftTree(tokens, parents)


@settings(max_examples=60, deadline=None)
@given(trees())
def test_structure_matches_brute_force(tree):
    parents = tree.parents.tolist()
    n = tree.num_nodes
    for i in range(n):
        chain, node = [], i
        while node != ROOT:
            chain.append(node)
            node = parents[node]
        assert tree.path(i) == chain[::-1]
        assert int(tree.depth[i]) == len(chain)
        assert tree.path_tokens(i) == [int(tree.tokens[j]) for j in chain[::-1]]
        assert i in tree.children(parents[i])
    mask = tree.ancestor_mask()
    assert mask.shape == (n, n)
    for i in range(n):
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(tree.path(i))
    assert sorted(tree.leaves()) == [i for i in range(n) if not tree.children(i)]
    assert tree.max_depth == (int(tree.depth.max()) if n else 0)
    # The trie of the root-to-leaf token paths is the same tree up to node order.
    rebuilt = DraftTree.from_paths([tree.path_tokens(leaf) for leaf in tree.leaves()])
    assert sorted(map(tuple, (rebuilt.path_tokens(i) for i in range(n)))) == \
        sorted(map(tuple, (tree.path_tokens(i) for i in range(n))))


def test_from_paths_breadth_first_and_truncated():
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
    assert tree.tokens.tolist() == [5, 9, 6, 8, 7]
    assert tree.parents.tolist() == [ROOT, ROOT, 0, 0, 2]
    small = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]], max_nodes=3)
    assert small.tokens.tolist() == [5, 9, 6] and small.parents.tolist() == [ROOT, ROOT, 0]
    chain = DraftTree.from_paths([[3, 3, 3]])
    assert chain.parents.tolist() == [ROOT, 0, 1] and chain.max_depth == 3
    assert DraftTree.empty().num_nodes == 0 and DraftTree.from_paths([]).num_nodes == 0


def test_tensor_inputs_are_copied():
    tokens = torch.tensor([4, 2], dtype=torch.int32)
    tree = DraftTree(tokens, torch.tensor([-1, 0]))
    tokens[0] = 9
    assert tree.tokens.tolist() == [4, 2] and tree.tokens.dtype == torch.int64


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=[1, 2], parents=[-1]), r"parents: expected 2 entries"),
    (dict(tokens=[1, 2], parents=[-1, 1]), r"parents\[1\]: expected a parent in \[-1, 0\]"),
    (dict(tokens=[1], parents=[-2]), r"parents\[0\]: expected a parent"),
    (dict(tokens=[1, 1], parents=[-1, -1]), r"tokens\[1\]: expected distinct tokens among siblings"),
    (dict(tokens=[-1], parents=[-1]), r"tokens: expected token ids >= 0"),
    (dict(tokens=[1.5], parents=[-1]), r"tokens\[0\]: expected an int"),
    (dict(tokens=torch.tensor([1.0]), parents=[-1]), r"tokens: expected an integer tensor"),
    (dict(tokens=torch.tensor([[1]]), parents=[-1]), r"tokens: expected a 1-D tensor"),
    (dict(tokens="ab", parents=[-1]), r"tokens: expected a 1-D integer tensor or a sequence"),
    (dict(tokens=[1], parents=[-1], draft_probs=torch.ones(1, 4)), r"draft_probs: expected 2 rows"),
    (dict(tokens=[5], parents=[-1], draft_probs=torch.ones(2, 4)), r"tokens: expected ids < vocab 4"),
    (dict(tokens=[1], parents=[-1], draft_probs=torch.ones(2)), r"draft_probs: expected a 2-D floating tensor"),
    (dict(tokens=[1, 2], parents=[-1, 0], draft_probs=torch.tensor([[0.5, 0.5, 0.0]] * 3)),
     r"draft_probs: expected a positive probability for node 1's token 2 in its parent's row, got 0.0"),
    (dict(tokens=[1], parents=[-1], token_probs=torch.ones(2)), r"token_probs: expected a 1-D tensor of 1"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DraftTree(**kwargs)


def test_bad_node_is_named():
    tree = DraftTree([1, 2], [-1, 0])
    with pytest.raises(ValueError, match=r"node: expected an int in \[-1, 1\], got 2"):
        tree.path(2)
    with pytest.raises(ValueError, match=r"node: expected an int in \[-1, 1\], got -2"):
        tree.children(-2)
