"""treeattn.hf.TreeSearch on tiny random-init Llama, Qwen2 and DeepSeek-V3 models (fp32, CPU, no download):
log-probabilities equal the model's own, teacher-forced; a batched expansion equals separate ones with the
same generators; stop sequences across steps; every page back after release; bad input leaves the tree as
it was; a hypothesis state machine over add/expand/release."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

import treeattn
import treeattn.hf  # noqa: E402
from treeattn.hf.testing import FAMILIES, teacher_forced_logprobs, tiny_model  # noqa: E402
from treeattn.testing import assert_close  # noqa: E402

PAGE = 4


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=7)


def _prompt(n, seed, vocab=128):
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_logprobs_are_the_models_own(model):
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=256)
    root = search.add_prompt(_prompt(9, 1))
    kids = search.expand([root], 3, max_new_tokens=5, temperature=0.8, top_k=50,
                         generator=torch.Generator().manual_seed(2))[0]
    grandkids = search.expand(kids[:2], 2, max_new_tokens=3, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert search.logprobs(root).numel() == 0
    for node in kids + [g for group in grandkids for g in group]:
        new = search.new_tokens(node)
        assert search.logprobs(node).shape == new.shape
        assert torch.equal(search.tokens(node)[-len(new):], new)
        expected = teacher_forced_logprobs(model, search.tokens(node), len(new))
        assert_close(search.logprobs(node), expected, torch.float32,
                     what=f"logprobs of node {node}")
        processed = search.logprobs(node, processed=True)
        assert processed.shape == new.shape and bool((processed <= 0).all())
    for group, parent in zip(grandkids, kids[:2]):
        assert all(search.parent(g) == parent for g in group)
        assert all(torch.equal(search.tokens(g)[: len(search.tokens(parent))], search.tokens(parent)) for g in group)
    s = search.stats()
    assert s["tokens_stored"] < s["tokens_if_unshared"] and s["decode_steps"] > 0
    tree = search.format_tree()
    assert all(f"node {n}: [" in tree for n in search.nodes()) and tree.count("\n") == len(search.nodes()) - 1


def test_a_pool_of_another_dtype():
    """An fp16 KV pool under an fp32 model: queries meet the pool's dtype, outputs come back in the model's."""
    model = tiny_model("llama", seed=7)
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=64, dtype=torch.float16)
    assert search.cache.tree.dtype == torch.float16
    root = search.add_prompt(_prompt(9, 3))
    for node in search.expand([root], 2, max_new_tokens=3, generator=torch.Generator().manual_seed(0))[0]:
        new = search.new_tokens(node)
        expected = teacher_forced_logprobs(model, search.tokens(node), len(new))
        assert_close(search.logprobs(node), expected, torch.float16)


def test_batched_expansion_equals_separate_ones(model):
    def run(together: bool):
        search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=256)
        a = search.add_prompt(_prompt(6, 4))
        b = search.add_prompt(_prompt(11, 5))
        b = search.expand([b], 1, max_new_tokens=2, generator=torch.Generator().manual_seed(9))[0][0]  # an unfed node
        gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
        kwargs = dict(max_new_tokens=4, temperature=1.5, stop=[[7]])
        if together:
            groups = search.expand([a, b], 3, generator=gens, **kwargs)
        else:
            groups = [search.expand([a], 3, generator=gens[0], **kwargs)[0],
                      search.expand([b], 3, generator=gens[1], **kwargs)[0]]
        return [[search.new_tokens(c).tolist() for c in g] for g in groups], search.stats()["decode_steps"]

    together, steps_together = run(True)
    separate, steps_separate = run(False)
    assert together == separate
    assert steps_together < steps_separate  # one batch for both


def test_stop_sequences_span_steps():
    model = tiny_model("llama", seed=3)
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=128)
    root = search.add_prompt(_prompt(5, 6))
    free = search.expand([root], 1, max_new_tokens=8, generator=torch.Generator().manual_seed(1))[0][0]
    tokens = search.new_tokens(free).tolist()
    stop = tokens[2:4]  # ends at the 4th token, unless it occurs earlier
    end = next(i + 2 for i in range(len(tokens) - 1) if tokens[i:i + 2] == stop)
    before = search.stats()["decode_steps"]
    stopped = search.expand([root], 1, max_new_tokens=8, stop=[[120, 121, 122], stop],
                            generator=torch.Generator().manual_seed(1))[0][0]
    assert search.new_tokens(stopped).tolist() == tokens[:end]
    assert search.stats()["decode_steps"] - before == end - 1  # the last token is not fed until expanded


def test_release_returns_every_page_and_bad_input_changes_nothing():
    model = tiny_model("qwen2", seed=5)
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=24)
    with pytest.raises(treeattn.OutOfPages, match="num_pages=.* to treeattn.hf.TreeSearch"):
        search.add_prompt(_prompt(100, 1))  # longer than the pool holds
    assert search.stats()["pages_used"] == 0 and search.nodes() == []
    root = search.add_prompt(_prompt(7, 2))
    kids = search.expand([root], 2, max_new_tokens=3, generator=torch.Generator().manual_seed(0))[0]
    search.release(kids[0])
    bad = [
        (dict(nodes=[kids[0]], num_samples=1), ValueError, "expand: node .* was released"),
        (dict(nodes=[], num_samples=1), ValueError, "nodes: expected a non-empty list"),
        (dict(nodes=[root], num_samples=0), ValueError, "num_samples: expected an int >= 1"),
        (dict(nodes=[root], num_samples=1, stop="\n\n"), ValueError, "stop: expected a list of stop sequences"),
        (dict(nodes=[root], num_samples=1, stop=[["a"]]), ValueError, "stop: expected token ids"),
        (dict(nodes=[root], num_samples=1, temperature=0.0), ValueError, "temperature"),
        (dict(nodes=[root], num_samples=1, generator=[None, None]), ValueError, "generator"),
        (dict(nodes=[root, kids[1]], num_samples=40), treeattn.OutOfPages, "num_pages"),
    ]
    snapshot = (search.stats(), search.nodes(), [search.tokens(n).tolist() for n in search.nodes()])
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            search.expand(kwargs.pop("nodes"), kwargs.pop("num_samples"), max_new_tokens=3, **kwargs)
        assert (search.stats(), search.nodes(), [search.tokens(n).tolist() for n in search.nodes()]) == snapshot
    with pytest.raises(ValueError, match="input_ids: expected token ids"):
        search.add_prompt([1, 2, 1000])
    search.release(root)  # the live child keeps the prompt
    assert search.tokens(kids[1])[:7].tolist() == _prompt(7, 2).tolist() and search.parent(kids[1]) == root
    search.release(kids[1])
    stats = search.stats()
    assert stats["pages_used"] == 0 and stats["nodes"] == 0 and search.nodes() == []
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model)


class SearchMachine(RuleBasedStateMachine):
    """Random add/expand/release: every live node's tokens extend its parent's, every sampled token has its
    log-probabilities, the pool never leaks (checked by releasing everything at the end)."""

    model = None

    def __init__(self):
        super().__init__()
        self.search = treeattn.hf.TreeSearch(self.model, page_size=PAGE, num_pages=40)
        self.seed = 0

    @rule(length=st.integers(1, 9))
    def add(self, length):
        self.seed += 1
        try:
            self.search.add_prompt(_prompt(length, self.seed))
        except treeattn.OutOfPages:
            pass

    @precondition(lambda self: self.search.nodes())
    @rule(data=st.data(), num_samples=st.integers(1, 2), new=st.integers(1, 3),
          stop=st.sampled_from([None, [[5]], [[3, 4]]]))
    def expand(self, data, num_samples, new, stop):
        live = self.search.nodes()
        picked = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=2))
        before = self.search.stats()
        self.seed += 1
        try:
            groups = self.search.expand(picked, num_samples, max_new_tokens=new, stop=stop,
                                        generator=torch.Generator().manual_seed(self.seed))
        except treeattn.OutOfPages:
            assert self.search.stats() == before
            return
        for parent, group in zip(picked, groups):
            assert len(group) == num_samples
            for c in group:
                n = len(self.search.new_tokens(c))
                assert 1 <= n <= new and self.search.parent(c) == parent
                assert self.search.logprobs(c).shape == (n,)

    @precondition(lambda self: self.search.nodes())
    @rule(data=st.data())
    def release(self, data):
        self.search.release(data.draw(st.sampled_from(self.search.nodes())))

    @invariant()
    def paths_extend_parents(self):
        for node in self.search.nodes():
            parent = self.search.parent(node)
            if parent is not None and parent in self.search.nodes():
                p = self.search.tokens(parent)
                assert torch.equal(self.search.tokens(node)[: len(p)], p)

    def teardown(self):
        for node in self.search.nodes():
            self.search.release(node)
        stats = self.search.stats()
        assert stats["pages_used"] == 0 and stats["nodes"] == 0


def test_search_state_machine():
    SearchMachine.model = tiny_model("llama", seed=13)
    runner = SearchMachine.TestCase
    runner.settings = settings(max_examples=6, stateful_step_count=6, deadline=None,
                               suppress_health_check=list(HealthCheck))
    runner().runTest()


# ---- expand is all or nothing ----


def _state(search):
    """Everything a failed expand must leave as it was: the live nodes with their tokens, log-probabilities,
    parents and children, the stats (``pages_copied`` counts copies made, failed calls included) and which
    pages are in use."""
    stats = search.stats()
    stats.pop("pages_copied")
    allocator = search.cache.tree.allocator
    nodes = {n: (search.tokens(n).tolist(), search.logprobs(n).tolist(), search.logprobs(n, processed=True).tolist(),
                 search.parent(n), search.children(n)) for n in search.nodes()}
    return nodes, stats, [p for p in range(stats["num_pages"]) if allocator.refcount(p)]


class _FailOn:
    """A forward pre-hook on one decoder layer that raises ``error`` on its ``k``-th call (after the layers
    before it wrote their KV for the step)."""

    def __init__(self, module, k: int, error: BaseException | None = None):
        self.k, self.calls, self.error = k, 0, RuntimeError("injected failure") if error is None else error
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.k:
            raise self.error


def _check_logprobs(model, search, nodes):
    for node in nodes:
        new = search.new_tokens(node)
        expected = teacher_forced_logprobs(model, search.tokens(node), len(new))
        assert_close(search.logprobs(node), expected, torch.float32, what=f"logprobs of node {node}")


def test_expand_is_all_or_nothing_when_any_forward_fails(model):
    """A failure injected at every forward of a multi-step expand (the unfed parent's step, then each batched
    step) leaves the tree and the pool as they were; the retry's log-probabilities are the model's own."""
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=128)
    root = search.add_prompt(_prompt(6, 21))  # a mid-page prompt: children copy its tail page on write
    unfed = search.expand([root], 1, max_new_tokens=2, generator=torch.Generator().manual_seed(4))[0][0]
    layer = model.base_model.layers[-1]
    snapshot = _state(search)
    k = 1
    while True:
        hook = _FailOn(layer, k)
        try:
            groups = search.expand([root, unfed], 2, max_new_tokens=4, generator=torch.Generator().manual_seed(k))
        except RuntimeError as err:
            assert "injected failure" in str(err)
            assert _state(search) == snapshot, f"state changed by a failure at forward {k}"
            k += 1
            continue
        finally:
            hook.handle.remove()
        break
    assert k == 5, "expected 4 forwards: the unfed parent's token, then 3 batched steps"
    kids = [c for g in groups for c in g]
    assert [search.parent(c) for c in kids] == [root, root, unfed, unfed]
    _check_logprobs(model, search, kids + [unfed])
    for node in search.nodes()[::-1]:
        search.release(node)
    assert search.stats()["pages_used"] == 0


def test_expand_keyboard_interrupt_and_a_failed_prompt_change_nothing():
    model = tiny_model("llama", seed=7)
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=64)
    root = search.add_prompt(_prompt(5, 22))
    kid = search.expand([root], 1, max_new_tokens=3, generator=torch.Generator().manual_seed(1))[0][0]
    snapshot = _state(search)
    hook = _FailOn(model.base_model.layers[0], 3, KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            search.expand([kid, root], 3, max_new_tokens=5)
    finally:
        hook.handle.remove()
    assert _state(search) == snapshot
    # A prompt whose forward fails after it was stored (a hook on the whole model's output) is taken back.
    def fail_after(*args):
        raise RuntimeError("after the prompt")

    handle = model.register_forward_hook(fail_after)
    try:
        with pytest.raises(RuntimeError, match="after the prompt"):
            search.add_prompt(_prompt(9, 23))
    finally:
        handle.remove()
    assert _state(search) == snapshot
    kids = search.expand([kid], 2, max_new_tokens=3, generator=torch.Generator().manual_seed(2))[0]
    _check_logprobs(model, search, kids + [kid])


def test_expand_with_a_temperature_that_overflows_changes_nothing():
    model = tiny_model("qwen2", seed=8)
    search = treeattn.hf.TreeSearch(model, page_size=PAGE, num_pages=64)
    root = search.add_prompt(_prompt(5, 24))
    snapshot = _state(search)
    with pytest.raises(ValueError, match="temperature: expected a temperature .* finite"):
        search.expand(root, 2, max_new_tokens=3, temperature=1e-300)
    assert _state(search) == snapshot and search.nodes() == [root]
    kids = search.expand(root, 2, max_new_tokens=3, generator=torch.Generator().manual_seed(3))[0]
    _check_logprobs(model, search, kids)


def test_a_compiled_model():
    """``TreeSearch(torch.compile(model))`` drives the model under the wrapper."""
    model = tiny_model("llama", seed=7)
    search = treeattn.hf.TreeSearch(torch.compile(model), page_size=PAGE, num_pages=32)
    assert search.model is model
    root = search.add_prompt(_prompt(5, 25))
    kids = search.expand(root, 2, max_new_tokens=2, generator=torch.Generator().manual_seed(0))[0]
    _check_logprobs(model, search, kids)
