"""The speculative-decoding benchmark at a tiny size (a few training steps, two short prompts): its rows, the
token-identity check (and that it catches a differing output), the forward counts, the cached weights, the
synthetic task. No timing is asserted."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_speculative  # noqa: E402
import run_all  # noqa: E402
import summary  # noqa: E402

SPECULATIVE = {"hf_prompt_lookup", "treeattn_ngram", "hf_assisted", "treeattn_draft_model"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec")
    status = bench_speculative.main(["--out", str(out), "--train-steps", "3", "--prompts", "2", "--new-tokens", "5"])
    return out, status, json.loads((out / "speculative.json").read_text())


def test_rows_cover_every_method_and_batch_and_match_greedy(tiny_run):
    _, status, payload = tiny_run
    assert status == 0
    rows = payload["rows"]
    got = {(r["method"], r["batch"]) for r in rows}
    assert got == {(m, 1) for m in ["model.generate", *SPECULATIVE]} | {
        ("model.generate", 2), ("treeattn_ngram", 2), ("treeattn_draft_model", 2)}
    for r in rows:
        assert r["identical_to_greedy"] is True, r["method"]
        assert r["generated_tokens"] == 2 * 5
        assert r["forwards_per_token"] == pytest.approx(r["forward_passes"] / r["generated_tokens"])
        if r["method"] == "model.generate":
            assert r["forward_passes"] == 5 * (2 // r["batch"])  # T tokens in T forwards, prefill included
            assert r["forward_passes_per_call"] == [5] * (2 // r["batch"])
            continue
        assert sum(r["accepted_histogram"]) == r["verify_steps"] > 0
        assert r["accepted_draft_tokens"] == sum(i * c for i, c in enumerate(r["accepted_histogram"]))
        assert r["mean_accepted"] == pytest.approx(r["accepted_draft_tokens"] / r["verify_steps"])
        if r["method"].startswith("treeattn"):
            assert r["cache_forward_passes"] == r["forward_passes"]  # the hook and TreeCache.stats() agree
        if r["method"] in ("hf_assisted", "treeattn_draft_model"):
            assert r["draft_forward_passes"] > 0


def test_results_folder_has_the_summary_lines_the_plot_and_the_cached_weights(tiny_run):
    out, _, payload = tiny_run
    assert (out / "speculative_acceptance.png").stat().st_size > 0
    assert payload["model"]["steps"] == 3 and payload["model"]["cached"] is False
    assert payload["summary"][0]["value"].startswith("tiny copy-task Llama trained in the benchmark")
    text, _ = summary.write_summary(out)
    assert "| speculative | treeattn_ngram, batch 1 | target forwards per generated token |" in text
    assert "token-identical to greedy" in text and "HF prompt lookup" in text
    target, _, record = bench_speculative.load_or_train(out / "spec_model", 3, 0)
    assert record["cached"] is True
    trained, _, _ = bench_speculative.load_or_train(None, 3, 0)  # seeded: training again gives the same weights
    for a, b in zip(target.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)


def test_a_differing_output_is_reported_and_fails_the_run(monkeypatch, tmp_path):
    """The check compares tokens: a method whose output differs from greedy makes the row say so and main
    return a failure status."""
    real = bench_speculative.methods

    def with_a_wrong_method(draft, k=bench_speculative.NUM_SPECULATIVE_TOKENS):
        table = real(draft, k)
        batched, decode = table["treeattn_ngram"]

        def wrong(model, ids, n):
            out, forwards = decode(model, ids, n)
            out = out.clone()
            out[:, -1] = (out[:, -1] + 1) % bench_speculative.VOCAB
            return out, forwards

        return {"model.generate": table["model.generate"], "treeattn_ngram": (batched, wrong)}

    monkeypatch.setattr(bench_speculative, "methods", with_a_wrong_method)
    status = bench_speculative.main(["--out", str(tmp_path), "--train-steps", "1", "--prompts", "1",
                                     "--new-tokens", "3"])
    assert status == 1
    rows = json.loads((tmp_path / "speculative.json").read_text())["rows"]
    assert [(r["method"], r["identical_to_greedy"]) for r in rows] == [("model.generate", True),
                                                                        ("treeattn_ngram", False)]
    assert "OUTPUT DIFFERS FROM GREEDY" in summary.write_summary(tmp_path)[0]


def test_the_synthetic_task_repeats_itself_and_is_seeded():
    rng = np.random.default_rng(0)
    for _ in range(20):
        seq = bench_speculative.restated_steps(rng, 60)
        assert len(seq) == 60 and min(seq) >= 1 and max(seq) < bench_speculative.VOCAB
        bigrams = list(zip(seq, seq[1:]))
        assert len(set(bigrams)) < 0.6 * len(bigrams)  # steps are restated
    batch = bench_speculative.training_batch(np.random.default_rng(1), 6)
    assert batch.shape == (6, bench_speculative.TRAIN_LENGTH) and int(batch.min()) >= 1
    assert torch.equal(bench_speculative.prompts(4, 0), bench_speculative.prompts(4, 0))
    assert not torch.equal(bench_speculative.prompts(4, 0), bench_speculative.prompts(4, 1))


def test_histogram_counts_each_accepted_length_and_caps_the_last_bin():
    assert bench_speculative.histogram([0, 2, 2, 9], size=4) == [1, 0, 2, 1]


def test_run_all_runs_the_benchmark():
    assert "bench_speculative" in run_all.SUITE
