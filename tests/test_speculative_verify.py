"""Verification of draft trees: greedy against brute force and plain greedy decoding; tree speculative sampling
distributed exactly as the target (chi-square over the first two tokens), for draft-model trees sampled from
q, top-k trees and n-gram trees."""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_speculative_tree import trees

import treeattn.speculative.verify as verify_module
from treeattn.speculative import (
    ROOT,
    DraftTree,
    NgramIndex,
    draft_model_tree,
    draft_ngram_tree,
    verify_greedy,
    verify_greedy_batch,
    verify_sampling,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here have a handful of elements: intra-op threads only add wake-up latency (milliseconds
    per op on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Upper tail of the chi-square distribution with ``cells - 1`` degrees of freedom (no scipy needed)."""
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


class ToyModel:
    """Next-token distributions over ``vocab`` tokens that depend on the whole prefix (seeded by its hash)."""

    def __init__(self, vocab: int, salt: int, scale: float):
        self.vocab, self.salt, self.scale, self.cache = vocab, salt, scale, {}

    def logits(self, prefix) -> torch.Tensor:
        prefix = tuple(prefix)
        if prefix not in self.cache:
            seed = zlib.crc32(repr((self.salt, prefix)).encode())
            g = torch.Generator().manual_seed(seed)
            self.cache[prefix] = torch.randn(self.vocab, generator=g, dtype=torch.float64) * self.scale
        return self.cache[prefix]

    def probs(self, prefix) -> torch.Tensor:
        return torch.softmax(self.logits(prefix), -1)

    def rows(self, context, tree: DraftTree, fn) -> torch.Tensor:
        """The target's ``[n + 1, vocab]`` rows for a tree after ``context``."""
        return torch.stack([fn(tuple(context))] + [fn(tuple(context) + tuple(tree.path_tokens(i)))
                                                    for i in range(tree.num_nodes)])


# Greedy ----------------------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(trees(), st.integers(0, 2**31 - 1))
def test_greedy_accepts_longest_agreeing_path(tree, seed):
    vocab = 6
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (tree.num_nodes + 1, vocab), generator=g).float()  # ties on purpose
    best = scores.argmax(-1).tolist()
    parents = tree.parents.tolist()
    # Brute force: the deepest node whose every path token is its parent row's argmax.
    agreeing = [i for i in range(tree.num_nodes)
                if all(int(tree.tokens[j]) == best[parents[j] + 1] for j in tree.path(i))]
    deepest = max(agreeing, key=lambda i: (int(tree.depth[i]), -i), default=ROOT)
    result = verify_greedy(tree, scores)
    assert result.path == tree.path(deepest)
    assert result.tokens.tolist() == tree.path_tokens(deepest) + [best[deepest + 1]]
    assert result.draft_tokens == tree.num_nodes and result.accepted_draft_tokens == len(result.path)


@settings(max_examples=30, deadline=None)
@given(st.lists(trees(), max_size=4), st.integers(0, 2**31 - 1))
def test_greedy_batch_equals_one_by_one(batch, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(sum(t.num_nodes + 1 for t in batch), 6, generator=g)
    results = verify_greedy_batch(batch, scores)
    rows = scores.split([t.num_nodes + 1 for t in batch])
    assert len(results) == len(batch)
    for tree, row, result in zip(batch, rows, results):
        alone = verify_greedy(tree, row)
        assert result.path == alone.path and result.tokens.tolist() == alone.tokens.tolist()


def test_greedy_speculative_loop_equals_plain_greedy():
    """Greedy decoding of a repetitive toy model, one token per forward versus n-gram trees verified in one
    forward each: the same tokens, fewer forwards."""
    vocab = 8

    def next_scores(prefix):  # an order-2 model that falls into a cycle: its text repeats itself
        a, b = prefix[-2], prefix[-1]
        scores = torch.zeros(vocab)
        scores[(3 * a + 5 * b + 1) % vocab] = 1.0
        return scores

    prompt, length = [1, 2, 3, 4, 1, 2], 40
    plain = list(prompt)
    while len(plain) < len(prompt) + length:
        plain.append(int(next_scores(plain).argmax()))

    seq, index, forwards, accepted = list(prompt), NgramIndex(prompt, max_ngram=3), 0, 0
    while len(seq) < len(prompt) + length:
        tree = draft_ngram_tree(index, 6)
        rows = torch.stack([next_scores(seq)] + [next_scores(seq + tree.path_tokens(i)) for i in range(tree.num_nodes)])
        result = verify_greedy(tree, rows)
        forwards += 1
        accepted += result.accepted_draft_tokens
        new = result.tokens.tolist()[: len(prompt) + length - len(seq)]
        seq += new
        index.extend(new)
    assert seq == plain
    assert accepted > 0 and forwards < length


# Sampling --------------------------------------------------------------------------------------------------
VOCAB = 5


def draw_tree(kind: str, context, draft: ToyModel, g: torch.Generator) -> DraftTree:
    budget = int(torch.randint(0, 7, (1,), generator=g))
    top_k = int(torch.randint(1, 4, (1,), generator=g))

    def skewed(n):  # proposals independent of the target but not uniform (uniform ones hide some bugs)
        return torch.multinomial(draft.probs(()).float(), n, replacement=True, generator=g).tolist()

    if kind == "ngram":  # a history that the n-gram drafter continues
        history = skewed(10) + list(context)
        return draft_ngram_tree(NgramIndex(history, max_ngram=2), budget)
    if kind == "paths":  # arbitrary deterministic proposals
        return DraftTree.from_paths([skewed(int(torch.randint(1, 4, (1,), generator=g))) for _ in range(top_k)],
                                    max_nodes=budget)
    return draft_model_tree(lambda paths: torch.stack([draft.logits(tuple(context) + tuple(p)) for p in paths]),
                            budget, top_k=top_k, sample=(kind == "sampled"), generator=g)


def sample_two_tokens(kind: str, target: ToyModel, draft: ToyModel, tree_gen, verify_gen):
    context: list[int] = []
    while len(context) < 2:
        tree = draw_tree(kind, context, draft, tree_gen)
        result = verify_sampling(tree, target.rows(context, tree, target.probs), generator=verify_gen)
        assert result.tokens.numel() == result.accepted_draft_tokens + 1
        context += result.tokens.tolist()
    return context[0], context[1]


def two_token_p_value(kind: str, samples: int, seed: int) -> float:
    target = ToyModel(VOCAB, salt=seed, scale=0.9)
    draft = ToyModel(VOCAB, salt=seed + 1, scale=1.2)
    tree_gen, verify_gen = torch.Generator().manual_seed(2 * seed), torch.Generator().manual_seed(2 * seed + 1)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for _ in range(samples):
        a, b = sample_two_tokens(kind, target, draft, tree_gen, verify_gen)
        counts[a, b] += 1
    expected = torch.stack([target.probs(()) [a] * target.probs((a,)) for a in range(VOCAB)]) * samples
    return chi_square_p_value(counts.flatten(), expected.flatten())


@pytest.mark.parametrize("kind, seed", [("sampled", 1), ("sampled", 2), ("topk", 3), ("ngram", 4), ("paths", 5)])
def test_sampling_is_distributed_as_the_target(kind, seed):
    assert two_token_p_value(kind, 4000, seed) > 1e-3


@pytest.mark.parametrize("kind", ["sampled", "topk", "ngram", "paths"])
def test_chi_square_detects_a_wrong_residual(kind, monkeypatch):
    """The statistical test has power: sampling the bonus token from the unchanged target after a rejection
    (a classic bug) fails it."""
    def unchanged(p, q, x):
        return p
    monkeypatch.setattr(verify_module, "_residual", unchanged)
    assert two_token_p_value(kind, 3000, 7) < 1e-6


def test_sampling_accepts_what_the_target_is_sure_of():
    tree = DraftTree([2, 1, 3], [ROOT, ROOT, 0])
    probs = torch.zeros(4, 4)
    probs[0, 1] = 1.0  # root: the second sibling is certain
    probs[1:, 0] = 1.0
    probs[2, 3] = 0.0
    result = verify_sampling(tree, probs, generator=torch.Generator().manual_seed(0))
    assert result.path == [1] and result.tokens.tolist() == [1, 0]
    # A sibling with q == p everywhere is always accepted.
    q = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), -1)
    sampled = DraftTree([2], [ROOT], draft_probs=q[:2])
    for seed in range(20):
        out = verify_sampling(sampled, q[:2], generator=torch.Generator().manual_seed(seed))
        assert out.path == [0]


def test_verify_bad_input_is_named():
    tree = DraftTree([4, 1], [ROOT, 0])
    with pytest.raises(ValueError, match=r"target_scores: expected 3 rows \(root \+ one per node\), got 2"):
        verify_greedy(tree, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"target_scores: expected vocab > 4 \(the largest draft token\), got 4"):
        verify_greedy(tree, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"target_probs: expected a 2-D floating tensor"):
        verify_sampling(tree, torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target_scores: expected 5 rows \(num_nodes \+ 1 per tree\), got 4"):
        verify_greedy_batch([tree, DraftTree.empty(), DraftTree.empty()], torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"target_scores \(tree 1\): expected vocab > 4"):
        verify_greedy_batch([DraftTree.empty(), tree], torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"target_probs: expected a 2-D floating tensor"):
        verify_sampling(tree, [[0.2]])
    sampled = DraftTree([4], [ROOT], draft_probs=torch.full((2, 5), 0.2))
    with pytest.raises(ValueError, match=r"target_probs: expected vocab 5 \(as draft_probs\), got 6"):
        verify_sampling(sampled, torch.full((2, 6), 1 / 6))


def test_empty_tree_is_plain_decoding():
    probs = torch.tensor([[0.0, 0.0, 1.0]])
    assert verify_greedy(DraftTree.empty(), probs).tokens.tolist() == [2]
    out = verify_sampling(DraftTree.empty(), probs)
    assert out.tokens.tolist() == [2] and out.path == [] and out.draft_tokens == 0
    assert math.isclose(float(probs.sum()), 1.0)
