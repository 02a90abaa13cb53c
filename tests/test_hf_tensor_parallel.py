"""treeattn.hf under transformers' tensor parallelism: two CPU processes over gloo, tiny models loaded with
``tp_plan="auto"`` (and DeepSeek-V3 with its heads split too). The ranks run in ``tests/tp_worker.py``; the
test starts them once for every case, bounds them in time and always stops them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)
if not hasattr(pytest.importorskip("transformers.distributed").DistributedConfig, "tp_plan"):
    pytest.skip("needs transformers' DistributedConfig(tp_plan=...) (transformers 5)", allow_module_level=True)

import treeattn.hf  # noqa: E402
from treeattn.hf import adapter  # noqa: E402
from treeattn.hf.testing import tiny_model  # noqa: E402
from treeattn.testing import assert_close  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
WORLD_SIZE = 2
TIMEOUT_S = 240  # both ranks together; a hung collective is killed, never waited on

# What the worker runs: (family, case) pairs, and the heads each rank holds (query, KV) for every family.
GENERATE = [("llama", "greedy"), ("llama", "sampling"), ("llama", "beams"), ("dsv3", "greedy"),
            ("dsv3_split", "greedy"), ("dsv3_split", "sampling")]
LOCAL_HEADS = {"llama": (2, 1), "dsv3": (4, 1), "dsv3_split": (2, 1)}


def _launch(out_dir: str, llama: str, dsv3: str) -> list[dict]:
    env = dict(os.environ, WORLD_SIZE=str(WORLD_SIZE), CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    ranks, logs = [], []
    try:
        for rank in range(WORLD_SIZE):
            log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
            logs.append(log)
            ranks.append(subprocess.Popen(
                [sys.executable, WORKER, out_dir, llama, dsv3], stdout=log, stderr=subprocess.STDOUT,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            ))
        deadline = time.monotonic() + TIMEOUT_S
        for process in ranks:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    results = []
    for rank, process in enumerate(ranks):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        if process.returncode != 0 or not os.path.exists(path):
            with open(os.path.join(out_dir, f"rank{rank}.log")) as log:
                tail = log.read()[-4000:]
            pytest.fail(
                f"rank {rank}: exit status {process.returncode} (killed after {TIMEOUT_S} s if negative)\n{tail}")
        results.append(torch.load(path, weights_only=False))
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each rank's worker recorded, keyed ``family/case``."""
    root = tmp_path_factory.mktemp("tp")
    tiny_model("llama", seed=1).save_pretrained(root / "llama")
    tiny_model("deepseek_v3", seed=2).save_pretrained(root / "dsv3")
    return _launch(str(root), str(root / "llama"), str(root / "dsv3"))


def _result(results: dict, key: str):
    family = key.split("/")[0]
    assert f"{family}/load" not in results, results.get(f"{family}/load")
    value = results[key]
    assert not isinstance(value, str), value  # a traceback
    return value


@pytest.mark.parametrize("family", sorted(LOCAL_HEADS))
def test_cache_holds_the_local_heads(ranks, family):
    for results in ranks:
        assert _result(results, f"{family}/heads") == LOCAL_HEADS[family]


@pytest.mark.parametrize("family,case", GENERATE)
def test_generate_matches_model_generate_under_tp(ranks, family, case):
    for results in ranks:
        out = _result(results, f"{family}/{case}")
        assert torch.equal(out["tree"], out["hf"]), (out["tree"], out["hf"])
        if "hf_scores" in out:
            assert_close(out["tree_scores"], out["hf_scores"], torch.float32, what="sequences_scores")
    first, second = (r[f"{family}/{case}"] for r in ranks)
    assert torch.equal(first["tree"], second["tree"])  # the ranks sampled in lockstep


@pytest.mark.parametrize("family", ["llama", "dsv3_split"])
def test_tree_search_expands_the_same_nodes_on_every_rank(ranks, family):
    first, second = (_result(r, f"{family}/search") for r in ranks)
    assert len(first["nodes"]) == 1 + 3 + 2 * 2
    assert first["nodes"] == second["nodes"] and first["parents"] == second["parents"]
    assert first["grandchildren"] == second["grandchildren"]
    for a, b in zip(first["tokens"], second["tokens"]):
        assert torch.equal(a, b)
    for a, b in zip(first["logprobs"], second["logprobs"]):
        assert torch.equal(a, b)


def test_tp_generate_example_runs_sharded(ranks):
    for rank, results in enumerate(ranks):
        printed = results["example"]
        assert not printed.startswith("Traceback"), printed
        assert f"rank {rank} of 2: 2 of 4 query heads, 1 of 2 KV heads" in printed
    assert "check: the same sequences as model.generate under the same sharding (2 processes)" in ranks[0]["example"]


# ---- layouts treeattn.hf does not serve (no process group needed: the check reads the model's config) ----


@pytest.mark.parametrize("name,what", [("pp_size", "pipeline parallelism"), ("fsdp_size", "fully sharded"),
                                       ("dp_replicate_size", "replicated data parallelism")])
def test_unsupported_parallel_layout_is_named(name, what):
    model = tiny_model("llama", layers=1)
    model.config.distributed_config = types.SimpleNamespace(**{"tp_size": 2, name: 2})
    with pytest.raises(treeattn.hf.UnsupportedModel,
                       match=f"distributed_config: expected tensor parallelism only.*{what}"):
        treeattn.hf.TreeCache(model, num_pages=4)


class _Shard:
    """A stand-in for a DTensor weight: ``shape`` of the whole, ``to_local()`` of this rank's rows."""

    def __init__(self, full: int, local: int):
        self.shape = torch.Size([full, 8])
        self._local = torch.empty(local, 8)

    def to_local(self):
        return self._local


def _attention(**projections) -> torch.nn.Module:
    attention = torch.nn.Module()
    for name, shard in projections.items():
        setattr(attention, name, types.SimpleNamespace(weight=shard))
    return attention


def test_heads_are_counted_per_rank():
    attention = _attention(k_proj=_Shard(full=64, local=16))
    assert adapter._local_heads(attention, "k_proj", 8, "llama") == 2
    assert adapter._local_heads(attention, "q_proj", 8, "llama") == 8  # no such projection, nothing sharded


def test_a_shard_that_splits_a_head_is_rejected():
    attention = _attention(k_proj=_Shard(full=64, local=20))
    with pytest.raises(treeattn.hf.UnsupportedModel,
                       match="expected a tensor-parallel size that divides llama's 8 heads"):
        adapter._local_heads(attention, "k_proj", 8, "llama")
