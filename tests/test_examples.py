"""The examples run end to end at small sizes; each checks itself (against model.generate, or the model's own
teacher-forced log-probabilities)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import beam_search  # noqa: E402
import best_of_n  # noqa: E402
import self_consistency  # noqa: E402
import step_beam_search  # noqa: E402


def test_best_of_n_example(capsys):
    best_of_n.main(["--n", "4", "--new-tokens", "4", "--prompt", "11"])
    out = capsys.readouterr().out
    assert "best sample:" in out and "same sequences as model.generate" in out and "% saved" in out


def test_beam_search_example(capsys):
    beam_search.main(["--beams", "3", "--new-tokens", "3", "--prompts", "9", "6", "--family", "deepseek_v3"])
    out = capsys.readouterr().out
    assert "same sequences and beam scores" in out and "% saved" in out


def test_step_beam_search_example(capsys):
    step_beam_search.main(["--rounds", "2", "--keep", "2", "--samples", "2", "--step-tokens", "3", "--family", "qwen2"])
    out = capsys.readouterr().out
    assert "logprobs match the model's own" in out and "% of the pages saved" in out and "batched decode steps" in out


def test_self_consistency_example(capsys):
    self_consistency.main(["--samples", "5", "--new-tokens", "3", "--family", "deepseek_v3"])
    out = capsys.readouterr().out
    assert "vote on the last token" in out and "% of the pages saved" in out and "batched decode steps" in out
