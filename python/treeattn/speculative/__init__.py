"""Speculative decoding over token trees, model-free parts: draft a tree, verify it against the target.

    index = NgramIndex(prompt_ids)                       # per sequence; index.extend(accepted) each step
    tree = draft_ngram_tree(index, num_speculative_tokens=8)
    tree = draft_model_tree(next_logits, 8, top_k=4)    # or from a small draft model (DraftTreeBuilder: by depth)
    # one target forward over the tree: node i attends to the context and tree.path(i)
    result = verify_greedy(tree, target_scores)          # or verify_sampling(tree, target_probs, generator=g)
    result.tokens                                        # accepted draft tokens + the target's bonus token

A :class:`DraftTree` is a tree of 1-token nodes after the last accepted token (parents before children), the
shape a tree-decode step verifies in one forward. Greedy verification accepts the longest path that matches
the target's argmax; sampling verification (recursive rejection over siblings) emits tokens distributed
exactly as the target's, for deterministic proposals (n-gram, top-k) and for children sampled without
replacement from a draft distribution alike.
"""

from .cached import CachedContinuations
from .draft_model import DraftTreeBuilder, draft_model_tree
from .ngram import Continuation, NgramIndex, TokenSource, draft_ngram_tree
from .tree import ROOT, DraftTree
from .verify import Verification, verify_greedy, verify_greedy_batch, verify_sampling

__all__ = [
    "CachedContinuations",
    "ROOT",
    "Continuation",
    "DraftTree",
    "DraftTreeBuilder",
    "NgramIndex",
    "TokenSource",
    "Verification",
    "draft_model_tree",
    "draft_ngram_tree",
    "verify_greedy",
    "verify_greedy_batch",
    "verify_sampling",
]
