"""Draft-model trees: budget, depth, one call per depth, the best nodes over all depths by cumulative
probability (a chain for a confident draft, a wide tree for a flat one), sampled children drawn from the
draft distribution, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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
    # One call per depth, and one more when the last depth grown kept nothing.
    assert tree.max_depth <= len(draft.calls) <= tree.max_depth + 1
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
    assert _kept_paths(tree) == _best_paths(draft.model, budget, top_k, budget)


def _kept_paths(tree) -> list[tuple[int, ...]]:
    return sorted(tuple(tree.path_tokens(i)) for i in range(tree.num_nodes))


def _best_paths(model, budget: int, top_k: int, max_depth: int) -> list[tuple[int, ...]]:
    """The reference: expand every depth up to ``max_depth`` (frontier: the last depth's ``top_k`` best by
    cumulative probability, never pruned), then keep the ``budget`` best candidates of all depths (ties to the
    earlier candidate)."""
    candidates = []  # (cumulative probability, path), in creation order
    frontier = [(1.0, ())]
    for _ in range(max_depth if budget else 0):
        made = []
        for cumulative, path in frontier:
            values, indices = torch.softmax(model.logits(path).float(), -1).topk(min(top_k, model.vocab))
            made += [(cumulative * v, path + (t,)) for v, t in zip(values.tolist(), indices.tolist()) if v > 0]
        candidates += made
        frontier = sorted(made, key=lambda c: -c[0])[:top_k]
    return sorted(path for _, path in sorted(candidates, key=lambda c: -c[0])[:budget])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 12), st.integers(1, 4), st.integers(1, 7), st.sampled_from([0.5, 2.0, 6.0]),
       st.integers(0, 2**16))
def test_kept_nodes_are_the_best_over_all_depths(vocab, budget, top_k, max_depth, scale, salt):
    """The tree is the ``budget`` best candidates by cumulative probability over all depths (closed under
    ancestors: a DraftTree holds every node's parent), whatever pruning stopped the growth early."""
    draft = Recorder(ToyModel(vocab, salt=salt, scale=scale))
    tree = draft_model_tree(draft, budget, top_k=top_k, max_depth=max_depth)
    assert _kept_paths(tree) == _best_paths(draft.model, budget, top_k, max_depth)
    assert len(draft.calls) <= min(max_depth, tree.max_depth + 1) if budget else not draft.calls
    cumulative = {(): 1.0}
    for i in range(tree.num_nodes):
        path = tuple(tree.path_tokens(i))
        cumulative[path] = cumulative[path[:-1]] * float(tree.token_probs[i])
        assert tree.parents[i] < i  # parents first
    # Children never outrank their parents, so the growth could stop once the frontier fell out of the kept set.
    assert all(cumulative[p[:-1]] >= c for p, c in cumulative.items() if p)


def test_confident_draft_gives_a_chain():
    """A draft almost sure of every next token spends the whole budget on one deep path."""
    def next_logits(paths):
        logits = torch.zeros(len(paths), 10)
        for row, path in enumerate(paths):
            logits[row, (3 * len(path) + 1) % 10] = 25.0
        return logits

    tree = draft_model_tree(next_logits, 8, top_k=2)
    assert tree.parents.tolist() == list(range(-1, 7))
    assert tree.tokens.tolist() == [(3 * d + 1) % 10 for d in range(8)]


def test_flat_draft_gives_a_wide_shallow_tree():
    """A draft with no preference keeps the root's ``top_k`` children and then the first one's; one more call
    finds the next depth no better than what is kept, and growth stops."""
    draft = Recorder(ToyModel(10, salt=0, scale=0.0))
    tree = draft_model_tree(draft, 8, top_k=4)
    assert tree.max_depth == 2 and len(tree.children(ROOT)) == 4
    assert [len(tree.children(c)) for c in tree.children(ROOT)] == [4, 0, 0, 0]
    assert len(draft.calls) == 3


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
    assert depths in (tree.max_depth, tree.max_depth + 1) and builder.frontier == []
    kept = builder.kept_nodes()
    assert [int(tree.tokens[i]) for i in range(tree.num_nodes)] == [builder.path_tokens(n)[-1] for n in kept]
    assert [kept.index(builder.parent(n)) if builder.parent(n) != ROOT else ROOT for n in kept] \
        == tree.parents.tolist()
    with pytest.raises(RuntimeError, match="DraftTreeBuilder.grow: expected a tree still growing"):
        builder.grow(torch.zeros(1, 9))
