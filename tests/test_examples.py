"""The examples (best-of-N sampling and beam search over a random-init HF Llama driven by TreeKVCache and
tree_decode) run end to end at small sizes; each checks every branch against the model's full-sequence logits."""

import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import beam_search_llama  # noqa: E402
import best_of_n_llama  # noqa: E402


def test_best_of_n_example(capsys):
    best_of_n_llama.main(["--n", "4", "--steps", "5", "--prompt", "11"])
    out = capsys.readouterr().out
    assert "match the HF model" in out and "% saved" in out


def test_best_of_n_branches_stop_and_release():
    # Branches of different lengths: the short ones are released mid-run and their pages reused.
    result = best_of_n_llama.best_of_n(5, 6, 9, page_size=4, max_tokens=[2, 6, 4, 6, 1], seed=3)
    assert best_of_n_llama.check(result) < 1e-4
    assert [len(b["tokens"]) for b in result["branches"]] == [2, 6, 4, 6, 1]
    assert result["peak"]["memory_saved"] > 0


def test_beam_search_example(capsys):
    beam_search_llama.main(["--width", "3", "--steps", "4", "--prompt", "9"])
    out = capsys.readouterr().out
    assert "match the HF model" in out and "% saved" in out
