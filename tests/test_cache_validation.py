"""TreeKVCache on bad input: each call raises ValueError / TypeError / OutOfPages naming the argument and
leaves the cache exactly as it was. One regression test per defect found by probing, then a fuzz test of
random call sequences that mix valid and invalid calls."""

import numpy as np
import pytest
import torch
from cache_model import DIM, DTYPE, HKV, LAYERS, assert_unchanged, check_books, make_cache, snapshot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from treeattn import OutOfPages, PlanCapacity, TreeKVCache
from treeattn._dispatch import force


def _rows(n):
    return torch.randn(n, HKV, DIM), torch.randn(n, HKV, DIM)


# ---- write with an out-of-range slot ----------------------------------------------------------------


def test_write_out_of_range_slot_is_an_error():
    """Slot num_pages * page_size on layer 0 used to land in layer 1's page 0; now the call raises and nothing
    is written. Slots the cache handed out are trusted until changed in place."""
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(5)
    slots = cache.slots(root)
    for bad in ([32], [3, 10**9, 1]):
        before = snapshot(cache)
        with pytest.raises(ValueError, match=rf"slots: expected values < 32 \(num_pages \* page_size.*got {max(bad)}"):
            cache.write(0, torch.tensor(bad), *_rows(len(bad)))
        assert_unchanged(cache, before)
    slots[1] = 32  # in place: the cache's own tensor is checked again
    with pytest.raises(ValueError, match="slots: expected values < 32"):
        cache.write(0, slots, *_rows(5))
    padded = torch.tensor([-1, 3, -7])  # negative slots are padding
    k, v = _rows(3)
    cache.write(1, padded, k, v)
    assert torch.equal(cache.layer(1).k_cache.reshape(-1, HKV, DIM)[3], k[1])
    with pytest.raises(ValueError, match="slots: expected a contiguous tensor"):
        cache.write(0, torch.arange(8)[::2], *_rows(4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_write_out_of_range_slot_is_skipped_by_the_kernels(backend):
    """Where no host check runs (graph capture, torch.compile), the write kernels skip a slot outside the layer
    instead of writing into the next layer or past the pool."""
    g = torch.Generator().manual_seed(2)
    pool = torch.randn(2, 2, 3, 4, HKV, DIM, generator=g)
    slots = torch.tensor([12, 5, 10**6, -3], dtype=torch.int64)  # 12 = 3 pages * 4: layer 1's page 0
    k, v = torch.randn(4, HKV, DIM, generator=g), torch.randn(4, HKV, DIM, generator=g)
    want = pool.clone()
    want[0, 0].flatten(0, 1)[5], want[1, 0].flatten(0, 1)[5] = k[1], v[1]
    with force(backend):
        torch.ops.treeattn.kv_write_run(slots, k, v, pool, 0)
    assert torch.equal(pool, want)


def test_fork_of_more_children_than_pool_slots_is_an_error():
    """fork(node, 10**12) used to build children until host memory ran out (found by the fuzz test below)."""
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(3)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"n: expected an int in \[0, 32\], got 1000000000000"):
        cache.fork(root, 10**12)
    assert_unchanged(cache, before)
    assert len(cache.fork(root, 32)) == 32



def test_write_checks_slots_changed_through_numpy_data_or_inference_mode():
    """A slot tensor changed in place through .numpy(), .data or under inference_mode kept its version (or
    had none), so write trusted it and the kernel silently skipped the row. On the CPU every write checks its
    slots now; the cache's own slot tensors keep a version counter even when made under inference mode."""
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(5)
    match = r"slots: expected values < 32 \(num_pages \* page_size.*got 32"
    changes = {
        "numpy": lambda t: t.numpy().__setitem__(1, 32),
        "data": lambda t: t.data.__setitem__(1, 32),
        "inference_mode": lambda t: t.__setitem__(1, 32),
    }
    for how, change in changes.items():
        with torch.inference_mode(how == "inference_mode"):
            slots = cache.slots(root)
            cache.write(0, slots, *_rows(5))  # known and good
            before = snapshot(cache)
            change(slots)
            with pytest.raises(ValueError, match=match):
                cache.write(0, slots, *_rows(5))
        assert_unchanged(cache, before)
    with torch.inference_mode():  # a caller's inference tensor: no version counter at all
        mine = torch.tensor([0, 1, 2])
        cache.write(1, mine, *_rows(3))
        mine[2] = 40
        with pytest.raises(ValueError, match="slots: expected values < 32"):
            cache.write(1, mine, *_rows(3))


class _FailingCopy(TorchDispatchMode):
    """Makes every copy_pages launch fail, as a device error would."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.treeattn.copy_pages_run.default:
            raise RuntimeError("copy_pages launch failed")
        return func(*args, **(kwargs or {}))


def test_append_is_atomic_when_its_copy_on_write_launch_fails():
    """append used to take the pages and grow the nodes before its copy-on-write launch: a failing launch left
    new pages and lengths without the copy. Now the copies run (into pages still free) before anything is
    committed."""
    cache = make_cache(page_size=4, num_pages=8)
    root = cache.add(6)
    cache.write(0, cache.slots(root), *_rows(6))
    kids = cache.fork(root, 3)
    before = snapshot(cache)
    with _FailingCopy(), pytest.raises(RuntimeError, match="copy_pages launch failed"):
        cache.append(kids, 2)
    assert_unchanged(cache, before)
    assert [cache.length(k) for k in kids] == [6, 6, 6]
    slots = cache.append(kids, 2)  # and the same call works afterwards
    assert slots.shape == (6,) and cache.stats()["pages_copied"] == 2
    check_books(cache)


def test_plan_and_append_reject_a_set_or_dict_of_nodes():
    """A set or dict of nodes was accepted: the queries' (and slots') order was whatever iteration gave."""
    cache = make_cache(page_size=4, num_pages=8)
    kids = cache.fork(cache.add(3), 3)
    before = snapshot(cache)
    for bad in (set(kids), frozenset(kids), dict.fromkeys(kids), dict.fromkeys(kids).keys()):
        with pytest.raises(ValueError, match=rf"nodes: expected a sequence .*got {type(bad).__name__}"):
            cache.plan(bad)
        with pytest.raises(ValueError, match=rf"leaves: expected a sequence .*got {type(bad).__name__}"):
            cache.append(bad)
    assert_unchanged(cache, before)
    assert cache.plan(tuple(kids)).num_queries == 3

# ---- integer and object arguments ---------------------------------------------------------------------


def test_integer_arguments_follow_the_plan_rule():
    """An int or numpy integer is accepted everywhere (np.int64(4) was), a bool never (page_size=True was 1)."""
    cache = TreeKVCache(np.int64(2), np.int32(2), np.int64(DIM), page_size=np.int64(4), num_pages=np.uint8(16),
                        dtype=DTYPE, device="cpu")
    assert (cache.num_layers, cache.page_size, cache.num_pages) == (2, 4, 16) and type(cache.page_size) is int
    root = cache.add(np.int64(5))
    kids = cache.fork(root, np.int16(2))
    slots = cache.append(kids, np.int64(2))
    cache.write(np.int64(1), slots, *_rows(4))
    assert cache.layer(np.int8(1)).k_cache.shape == (16, 4, HKV, DIM)
    cache.plan(kids, np.int64(2), num_qo_heads=np.int64(4), num_sms=np.int32(8))
    for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "num_pages"):
        args = dict(num_layers=2, num_kv_heads=2, head_dim=DIM, page_size=4, num_pages=16, dtype=DTYPE, device="cpu")
        for bad, error in ((True, TypeError), (4.0, TypeError), ("4", TypeError), (None, TypeError), (0, ValueError)):
            with pytest.raises(error, match=f"{name}: expected an int"):
                TreeKVCache(**{**args, name: bad})
    with pytest.raises(ValueError, match=r"page_size: expected an int in \[1, 2147483647\], got 2147483648"):
        TreeKVCache(1, 1, DIM, page_size=2**31, num_pages=1, device="cpu")
    with pytest.raises(ValueError, match="num_pages: expected an int in"):
        TreeKVCache(1, 1, DIM, page_size=2**20, num_pages=2**11, device="cpu")  # slots past int32
    with pytest.raises(TypeError, match="rope_dim: expected an int, got bool"):
        TreeKVCache.mla(1, rope_dim=False, num_pages=4, device="cpu")
    before = snapshot(cache)
    calls = [
        (lambda: cache.add(True), TypeError, "num_tokens"),
        (lambda: cache.fork(root, True), TypeError, "n: expected an int"),
        (lambda: cache.append(kids, 1.0), TypeError, "num_tokens"),
        (lambda: cache.layer(True), TypeError, "layer"),
        (lambda: cache.write(2, slots, *_rows(4)), ValueError, r"layer: expected an int in \[0, 1\], got 2"),
        (lambda: cache.plan(kids, num_qo_heads=0), ValueError, "num_qo_heads"),
        (lambda: cache.plan(kids, num_sms=True), TypeError, "num_sms"),
    ]
    for call, error, match in calls:
        with pytest.raises(error, match=match):
            call()
    assert_unchanged(cache, before)


def test_plan_capacity_and_into_of_the_wrong_kind():
    """capacity= a tuple and into="x" used to fail with AttributeError deep in the planner; a plan of a cache
    with another page size was accepted as into=."""
    cache = make_cache(page_size=4, num_pages=16)
    kids = cache.fork(cache.add(6), 2)
    cache.append(kids)
    plan = cache.plan(kids, capacity=PlanCapacity(8, 64, 64, 8, 16))
    before = snapshot(cache)
    with pytest.raises(TypeError, match="capacity: expected a treeattn.PlanCapacity or None, got tuple"):
        cache.plan(kids, capacity=(8, 64, 64, 8, 16))
    with pytest.raises(TypeError, match="into: expected a treeattn.TreePlan .* got str"):
        cache.plan(kids, into="x")
    other = make_cache(page_size=2, num_pages=16)
    with pytest.raises(ValueError, match="into: expected a plan with page_size 2 \\(the cache's\\), got 4"):
        other.plan(other.fork(other.add(3), 2), into=plan)
    assert_unchanged(cache, before)
    assert cache.plan(kids, into=plan) is plan


def test_default_device_and_bad_devices():
    """The default device is CUDA when available, else the CPU (it was always "cuda"); a bad device raises
    naming device instead of torch's driver error."""
    cache = TreeKVCache(1, 1, DIM, num_pages=2, dtype=DTYPE)
    assert cache.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cache.slots(cache.add(3)).device == cache.device
    for bad in ("nonsense", "meta", 3.5, True, object()):
        with pytest.raises((ValueError, TypeError), match="device: expected"):
            TreeKVCache(1, 1, DIM, num_pages=2, device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError,
                           match="device: expected an available device, got 'cuda' but CUDA is not available"):
            TreeKVCache(1, 1, DIM, num_pages=2, device="cuda")
    else:
        with pytest.raises(ValueError, match="device: expected a CUDA index"):
            TreeKVCache(1, 1, DIM, num_pages=2, device=f"cuda:{torch.cuda.device_count()}")


# ---- fuzz: random call sequences mixing valid and invalid calls ---------------------------------------

_BAD_INTS = [-1, 0, True, False, 2.0, "3", None, np.float32(1), 10**12, [1]]
_ERRORS = (ValueError, TypeError, OutOfPages)


class _Fuzz:
    """Draws one call per step: half valid (arguments from the cache's live state), half with one bad argument."""

    def __init__(self, data, cache):
        self.data, self.cache = data, cache
        self.handed_out: list[torch.Tensor] = []
        self.released: list[int] = []

    def draw(self, strategy, label):
        return self.data.draw(strategy, label=label)

    def node(self, valid):
        live = self.cache.tree.live_ids()
        if valid and live:
            return self.draw(st.sampled_from(live), "node")
        bad = [10**6, -1, True, 1.5, "0", None, np.float64(0), torch.tensor([0, 1])] + self.released[-2:]
        return self.draw(st.sampled_from(bad), "bad node")

    def nodes(self, valid):
        live = self.cache.tree.live_ids()
        if valid and live:
            picks = self.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4, unique=True), "nodes")
            return self.draw(st.sampled_from([picks, torch.tensor(picks), np.array(picks)]), "nodes form")
        one = live[0] if live else 0
        bad = [[one, one], [[one]], torch.tensor([float(one)]), [True], "ab", None, 7.0, [one, 10**6]]
        return self.draw(st.sampled_from(bad) if live else st.just([10**6]), "bad nodes")

    def count(self, valid, low=0, high=4):
        if valid:
            return self.draw(st.sampled_from([int, np.int64]), "int type")(self.draw(st.integers(low, high), "count"))
        return self.draw(st.sampled_from(_BAD_INTS), "bad count")

    def slots(self, valid):
        n_slots = self.cache.num_pages * self.cache.page_size
        if valid:
            drawn = self.draw(st.lists(st.integers(-1, n_slots - 1), max_size=5), "slots")
            fresh = torch.tensor(drawn, dtype=torch.int64)
            return self.draw(st.sampled_from(self.handed_out[-3:] + [fresh]), "valid slots")
        bad = [torch.tensor([n_slots]), torch.tensor([0, 2**40]), torch.tensor([0, 1], dtype=torch.int32),
               torch.zeros(2, 1, dtype=torch.int64), torch.arange(6)[::2], [0, 1], torch.tensor([0.0])]
        return self.draw(st.sampled_from(bad), "bad slots")

    def step(self):
        cache = self.cache
        op = self.draw(st.sampled_from(["add", "fork", "append", "release", "write", "plan", "slots"]), "op")
        valid = self.draw(st.booleans(), "valid")
        if op == "add":
            return lambda: cache.add(self.count(valid, 0, 9))
        if op == "fork":
            if not valid and self.draw(st.booleans(), "bad n"):
                node, n = self.node(True), self.count(False)
            else:
                node, n = self.node(valid), self.count(valid, 0, 2)
            return lambda: cache.fork(node, n)
        if op == "append":
            leaves = self.nodes(valid)
            k = self.count(valid, 1, 5) if valid or self.draw(st.booleans(), "bad k") else 1
            return lambda: self.handed_out.append(cache.append(leaves, k))
        if op == "release":
            node = self.node(valid)
            return lambda: (cache.release(node), self.released.append(node))
        if op == "slots":
            node = self.node(valid)
            which = st.sampled_from([cache.slots, cache.path_slots])
            return lambda: self.handed_out.append(self.draw(which, "which")(node))
        if op == "write":
            bad = None if valid else self.draw(st.sampled_from(["layer", "slots", "k", "v"]), "bad arg")
            slots = self.slots(bad != "slots")
            n = slots.shape[0] if isinstance(slots, torch.Tensor) and slots.dim() else 1
            layer = self.count(bad != "layer", 0, LAYERS - 1)
            k, v = _rows(n)
            if bad in ("k", "v"):
                wrong = self.draw(st.sampled_from([torch.zeros(n + 1, HKV, DIM), k.half(), torch.zeros(n, HKV, DIM + 1),
                                                   torch.zeros(n, HKV * DIM), None, "k"]), "bad rows")
                k, v = (wrong, v) if bad == "k" else (k, wrong)
            return lambda: cache.write(layer, slots, k, v)
        nodes = self.nodes(valid or self.draw(st.booleans(), "bad nodes?"))
        kwargs = {} if valid else self.draw(st.sampled_from([
            {"num_tokens": 0}, {"num_tokens": 10**6}, {"num_tokens": True}, {"capacity": (1, 2, 3, 4, 5)},
            {"into": "x"}, {"num_qo_heads": -4}, {"num_sms": 0}, {}]), "bad plan kwargs")
        return lambda: cache.plan(nodes, **kwargs)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data(), st.sampled_from([1, 2, 4]), st.integers(3, 12))
def test_random_calls_either_work_or_change_nothing(data, page_size, num_pages):
    cache = make_cache(page_size=page_size, num_pages=num_pages)
    fuzz = _Fuzz(data, cache)
    for _ in range(30):
        call = fuzz.step()
        before = snapshot(cache)
        try:
            call()
            event("call worked")
        except _ERRORS as err:
            event(f"call failed: {type(err).__name__}")
            assert str(err), "an error must say what was wrong"
            assert_unchanged(cache, before)
        check_books(cache)
