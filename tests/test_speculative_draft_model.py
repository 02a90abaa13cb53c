"""Draft-model trees: budget, depth, one call per depth, top-k children by cumulative probability, sampled
children drawn from the draft distribution, errors."""

import pytest
import torch
from test_speculative_verify import ToyModel, chi_square_p_value, one_thread  # noqa: F401  (fixture)

from treeattn.speculative import ROOT, draft_model_tree


class Recorder:
    def __init__(self, model: ToyModel):
        self.model, self.calls = model, []

    def __call__(self, paths):
        self.calls.append([list(p) for p in paths])
        return torch.stack([self.model.logits(p) for p in paths]).float()


@pytest.mark.parametrize("budget, top_k, seed", [(1, 1, 0), (7, 2, 1), (9, 3, 2), (13, 4, 3), (5, 8, 4)])
def test_top_k_tree(budget, top_k, seed):
    draft = Recorder(ToyModel(11, salt=seed, scale=2.0))
    tree = draft_model_tree(draft, budget, top_k=top_k)
    assert 0 < tree.num_nodes <= budget and tree.draft_probs is None
    assert len(draft.calls) == tree.max_depth
    for depth, paths in enumerate(draft.calls):
        assert all(len(p) == depth for p in paths) and len(paths) <= top_k
    probs = {(): draft.model.probs(())}
    for i in range(tree.num_nodes):
        probs[tuple(tree.path_tokens(i))] = draft.model.probs(tuple(tree.path_tokens(i)))
    for node in [ROOT, *range(tree.num_nodes)]:
        children = tree.children(node)
        assert len(children) <= top_k
        if children:
            q = probs[tuple(tree.path_tokens(node)) if node != ROOT else ()]
            # Siblings are the parent's most likely tokens, most likely first.
            assert [int(tree.tokens[c]) for c in children] == q.topk(len(children)).indices.tolist()
            for c in children:
                assert float(tree.token_probs[c]) == pytest.approx(float(q[int(tree.tokens[c])]), rel=1e-5)
    if top_k == 1:  # a chain: the draft model's greedy continuation
        assert tree.parents.tolist() == list(range(-1, tree.num_nodes - 1))
    # The root's children are the best candidates of the first round.
    assert len(tree.children(ROOT)) == min(top_k, budget)


def test_sampled_tree_records_its_distributions():
    draft = Recorder(ToyModel(7, salt=9, scale=1.0))
    g = torch.Generator().manual_seed(3)
    tree = draft_model_tree(draft, 8, top_k=3, sample=True, generator=g)
    assert tree.num_nodes == 8 and tree.draft_probs.shape == (9, 7)
    expanded = {tuple(p) for paths in draft.calls for p in paths}
    for node in [ROOT, *range(tree.num_nodes)]:
        path = tuple(tree.path_tokens(node)) if node != ROOT else ()
        row = tree.draft_probs[node + 1]
        if path in expanded:
            torch.testing.assert_close(row, draft.model.probs(path).float())
        else:
            assert not tree.children(node) and float(row.abs().sum()) == 0
        assert len(tree.children(node)) <= 3
    again = draft_model_tree(Recorder(draft.model), 8, top_k=3, sample=True, generator=torch.Generator().manual_seed(3))
    assert again.tokens.tolist() == tree.tokens.tolist() and again.parents.tolist() == tree.parents.tolist()


def test_sampled_children_follow_the_draft_distribution():
    """The first child is a draw from q, the second a draw from q without the first."""
    model = ToyModel(5, salt=4, scale=1.0)
    q = model.probs(()).float()
    g = torch.Generator().manual_seed(0)
    samples = 3000
    first, pair = torch.zeros(5, dtype=torch.float64), torch.zeros(5, 5, dtype=torch.float64)
    for _ in range(samples):
        tree = draft_model_tree(lambda paths: model.logits(()).float().expand(len(paths), 5), 2, top_k=2,
                                max_depth=1, sample=True, generator=g)
        a, b = tree.tokens.tolist()
        first[a] += 1
        pair[a, b] += 1
    assert chi_square_p_value(first, q.double() * samples) > 1e-3
    expected = torch.stack([q[a] * q / (1 - q[a]) for a in range(5)]).double()
    expected.fill_diagonal_(0)
    cells = expected.flatten() > 0
    assert chi_square_p_value(pair.flatten()[cells], expected.flatten()[cells] * samples) > 1e-3
    assert float(pair.diagonal().sum()) == 0


def test_depth_budget_and_support_limits():
    draft = Recorder(ToyModel(6, salt=1, scale=1.0))
    assert draft_model_tree(draft, 0).num_nodes == 0 and not draft.calls
    assert draft_model_tree(draft, 20, top_k=2, max_depth=2).max_depth == 2
    point = torch.full((6,), -float("inf"))
    point[4] = 0.0  # a one-token support: one child each, whatever top_k says
    chain = draft_model_tree(lambda paths: point.expand(len(paths), 6), 3, top_k=3, sample=True)
    assert chain.tokens.tolist() == [4, 4, 4] and chain.parents.tolist() == [ROOT, 0, 1]
    assert draft_model_tree(lambda paths: point.expand(len(paths), 6), 3, top_k=3).tokens.tolist() == [4, 4, 4]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"next_logits: expected a callable"):
        draft_model_tree(None, 4)
    with pytest.raises(ValueError,
                       match=r"next_logits: expected a \[1, vocab\] tensor \(one row per path\), got shape \[2, 5\]"):
        draft_model_tree(lambda paths: torch.zeros(2, 5), 4)
    with pytest.raises(ValueError, match=r"next_logits: expected a \[1, vocab\] tensor"):
        draft_model_tree(lambda paths: [0.0], 4)
    with pytest.raises(ValueError, match=r"top_k: expected an int >= 1, got 0"):
        draft_model_tree(lambda paths: torch.zeros(len(paths), 5), 4, top_k=0)
    with pytest.raises(ValueError, match=r"sample: expected a bool, got int"):
        draft_model_tree(lambda paths: torch.zeros(len(paths), 5), 4, sample=1)
    vocabs = iter([5, 6])
    with pytest.raises(ValueError, match=r"next_logits: expected vocab 5 as before, got 6"):
        draft_model_tree(lambda paths: torch.zeros(len(paths), next(vocabs)), 4, top_k=1)


def test_builder_grows_the_same_tree_by_depth():
    """DraftTreeBuilder, driven one depth at a time, grows draft_model_tree's tree; a finished one refuses
    to grow."""
    from treeattn.speculative import DraftTreeBuilder

    model = ToyModel(9, salt=4, scale=2.0)
    builder = DraftTreeBuilder(7, top_k=2)
    depths = 0
    while not builder.done:
        assert all(f == ROOT for f in builder.frontier) if depths == 0 else ROOT not in builder.frontier
        builder.grow(torch.stack([model.logits(tuple(builder.path_tokens(f))) for f in builder.frontier]).float())
        depths += 1
    expected = draft_model_tree(Recorder(model), 7, top_k=2)
    tree = builder.tree()
    assert tree.tokens.tolist() == expected.tokens.tolist() and tree.parents.tolist() == expected.parents.tolist()
    assert depths == tree.max_depth and builder.frontier == []
    assert [builder.parent(i) for i in range(tree.num_nodes)] == tree.parents.tolist()
    with pytest.raises(RuntimeError, match="DraftTreeBuilder.grow: expected a tree still growing"):
        builder.grow(torch.zeros(1, 9))
