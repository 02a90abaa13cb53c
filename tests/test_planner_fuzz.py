"""Fuzzing the C++ planner's entry points (``_planner.plan_table``, ``_planner.plan_tree``) with garbage and
near-valid input. Every call runs in a sandbox process (only numpy and the planner loaded), so a crash
fails the test with the input that caused it instead of killing the run. Each call must raise ValueError or
TypeError, or return a plan that the brute-force oracle accepts."""

import pickle
import struct
import subprocess
import sys
from array import array
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planner_oracle import check_planner_result, random_forest, table_of_tree

from treeattn import _planner

# The sandbox: reads pickled (entry point, args, options) cases from stdin, answers each with a pickled
# ("ok", result) / ("error", type, message) / ("unexpected", type, repr). A crash ends the process.
_WORKER = r"""
import importlib.util, pickle, struct, sys
spec = importlib.util.spec_from_file_location("_planner", sys.argv[1])
planner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(planner)
read, write = sys.stdin.buffer.read, sys.stdout.buffer
while True:
    header = read(8)
    if len(header) < 8:
        break
    entry, args, options = pickle.loads(read(struct.unpack("<Q", header)[0]))
    try:
        reply = ("ok", getattr(planner, entry)(*args, planner.Options(**options)))
    except (ValueError, TypeError) as e:
        reply = ("error", type(e).__name__, str(e))
    except BaseException as e:
        reply = ("unexpected", type(e).__name__, repr(e))
    data = pickle.dumps(reply)
    write.write(struct.pack("<Q", len(data)) + data)
    write.flush()
"""


class Sandbox:
    """A planner in a child process; restarted after a crash (which fails the call that caused it)."""

    def __init__(self):
        self.proc = None

    def call(self, entry: str, args: tuple, options: dict):
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, _planner.__file__], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        case = (entry, args, options)
        data = pickle.dumps(case)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            header = self.proc.stdout.read(8)
            reply = pickle.loads(self.proc.stdout.read(struct.unpack("<Q", header)[0])) if len(header) == 8 else None
        except BrokenPipeError:
            reply = None
        if reply is None:
            code = self.proc.wait(timeout=30)
            pytest.fail(f"the planner crashed (exit status {code}) on {entry}{args!r} with options {options!r}")
        assert reply[0] != "unexpected", f"{entry}: {reply[1]} {reply[2]} on {args!r}, options {options!r}"
        return reply

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


_EXTREMES = [0, 1, -1, 2, 3, 15, 16, 17, 64, 2**31 - 1, 2**31, -(2**31), 2**32 + 1, 2**62, -(2**63)]
ints = st.one_of(st.integers(-3, 40), st.sampled_from(_EXTREMES), st.integers(-(2**63), 2**63 - 1))
scalars = st.one_of(ints, st.booleans(), st.none(), st.floats(allow_nan=True), st.text(max_size=3))


@st.composite
def arrays(draw):
    """Anything a table argument could be: int32 arrays (contiguous, strided, broadcast, empty, 2-D), other
    dtypes, lists, scalars."""
    values = draw(st.lists(ints.filter(lambda v: -(2**31) <= v < 2**31), max_size=12))
    kind = draw(st.sampled_from(["int32", "int32", "int32", "strided", "broadcast", "2d", "int64", "int16",
                                 "uint32", "float32", "bool", "big-endian", "list", "scalar"]))
    a = np.asarray(values, dtype=np.int32)
    if kind == "strided":
        return np.repeat(a, 2)[::2]
    if kind == "broadcast":
        return np.broadcast_to(a[:1] if a.size else np.zeros(1, np.int32), (draw(st.integers(0, 5)),))
    if kind == "2d":
        return a.reshape(1, -1) if draw(st.booleans()) else np.zeros((draw(st.integers(0, 3)), 0), np.int32)
    if kind in ("int64", "int16", "uint32", "float32", "bool"):
        return np.asarray(values, dtype=np.int64).astype(kind)
    if kind == "big-endian":
        return a.astype(">i4")
    if kind == "list":
        return values
    if kind == "scalar":
        return draw(scalars)
    return a


def capacities():
    small = st.integers(-2, 300)
    return st.one_of(st.none(), st.builds(SimpleNamespace, items=small, rows=small, partial_rows=small,
                                          merge_queries=small, nnz=small),
                     st.builds(SimpleNamespace, items=scalars), st.just((8, 8, 8, 8, 8)), st.just("x"))


def options():
    return st.fixed_dictionaries({"page_size": st.one_of(st.sampled_from([1, 2, 3, 16, 64]), scalars)}, optional={
        "num_pages": st.one_of(st.none(), ints), "share_prefixes": st.booleans(),
        "num_qo_heads": st.one_of(st.none(), ints), "num_kv_heads": st.one_of(st.none(), ints),
        "num_sms": st.one_of(st.sampled_from([1, 132]), ints), "capacity": capacities(),
        "max_queries_per_item": st.one_of(st.none(), st.integers(-1, 20)),
    })


@st.composite
def near_valid_tables(draw):
    """A valid table (shared prefixes, repeats, empty queries), then maybe one element changed."""
    page_size = draw(st.sampled_from([1, 2, 16, 64]))
    rows = draw(st.lists(st.lists(st.integers(0, 12), max_size=6), max_size=10))
    for i in range(1, len(rows)):  # share prefixes with earlier rows
        if draw(st.booleans()):
            donor = rows[draw(st.integers(0, i - 1))]
            rows[i] = donor[: draw(st.integers(0, len(donor)))] + rows[i]
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
    indices = np.asarray([p for r in rows for p in r], dtype=np.int32)
    last = np.asarray([draw(st.integers(1, page_size)) for _ in rows], dtype=np.int32)
    table = [indptr, indices, last]
    if draw(st.booleans()):
        which = draw(st.integers(0, 2))
        if table[which].size:
            table[which] = table[which].copy()
            at = draw(st.integers(0, table[which].size - 1))
            table[which][at] = draw(ints.filter(lambda v: -(2**31) <= v < 2**31))
    return table, page_size


_fuzz = settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))


@_fuzz
@given(table=st.tuples(arrays(), arrays(), arrays()), opts=options())
def test_plan_table_garbage(sandbox, table, opts):
    reply = sandbox.call("plan_table", table, opts)
    if reply[0] == "ok":
        check_planner_result(reply[1], [np.asarray(a) for a in table], opts["page_size"], _planner.PIECES,
                             share_prefixes=opts.get("share_prefixes", True))


@_fuzz
@given(case=near_valid_tables(), opts=options())
def test_plan_table_near_valid(sandbox, case, opts):
    table, page_size = case
    opts = {**opts, "page_size": page_size}
    reply = sandbox.call("plan_table", tuple(table), opts)
    if reply[0] == "ok":
        check_planner_result(reply[1], table, page_size, _planner.PIECES,
                             share_prefixes=opts.get("share_prefixes", True))


@st.composite
def page_buffers(draw):
    """A node's page list: int32 buffers (valid), or other buffers and objects."""
    kind = draw(st.sampled_from(["array", "array", "numpy", "strided", "int64", "bytes", "scalar", "2d"]))
    values = draw(st.lists(st.integers(-2, 2**31 - 1), max_size=5))
    if kind == "array":
        return array("i", values)
    if kind == "numpy":
        return np.asarray(values, np.int32)
    if kind == "strided":
        return np.repeat(np.asarray(values, np.int32), 2)[::2]
    if kind == "int64":
        return np.asarray(values, np.int64)
    if kind == "bytes":
        return bytes(len(values))
    if kind == "2d":
        return np.asarray(values, np.int32).reshape(1, -1)
    return draw(scalars)


@st.composite
def garbage_trees(draw):
    num_nodes = draw(st.integers(0, 6))
    seq = lambda n: st.one_of(st.lists(st.one_of(st.integers(-2, 40), ints), min_size=n, max_size=n),  # noqa: E731
                              st.lists(ints, max_size=8), scalars, st.just((1, 2)))
    return (draw(seq(num_nodes)), draw(seq(num_nodes)), draw(seq(num_nodes)),
            draw(st.one_of(st.lists(page_buffers(), min_size=num_nodes, max_size=num_nodes), scalars)),
            draw(seq(draw(st.integers(0, 5)))), draw(seq(draw(st.integers(0, 5)))))


@_fuzz
@given(tree=garbage_trees(), page_size=st.one_of(st.sampled_from([1, 4, 16]), scalars))
def test_plan_tree_garbage(sandbox, tree, page_size):
    reply = sandbox.call("plan_tree", tree, {"page_size": page_size})
    if reply[0] == "ok":
        names = ("parent", "start", "end", "pages", "query_owner", "query_end")
        table = table_of_tree(dict(zip(names, tree)), page_size)
        check_planner_result(reply[1], table, page_size, _planner.PIECES)


@_fuzz
@given(seed=st.integers(0, 2**31 - 1), page_size=st.sampled_from([1, 2, 16, 64]), num_nodes=st.integers(1, 12),
       field=st.sampled_from(["parent", "start", "end", "pages", "query_owner", "query_end", None]),
       index=st.integers(0, 40), value=ints, opts=options())
def test_plan_tree_near_valid(sandbox, seed, page_size, num_nodes, field, index, value, opts):
    tree = random_forest(np.random.default_rng(seed), page_size, num_nodes, extra_queries=2, empty_queries=1)
    if field is not None and tree[field]:
        entries = list(tree[field])
        if field == "pages":
            entries[index % len(entries)] = array("i", list(entries[index % len(entries)])[:-1])
        else:
            entries[index % len(entries)] = value
        tree[field] = entries
    opts = {**opts, "page_size": page_size}
    names = ("parent", "start", "end", "pages", "query_owner", "query_end")
    reply = sandbox.call("plan_tree", tuple(tree[n] for n in names), opts)
    if reply[0] == "ok":
        check_planner_result(reply[1], table_of_tree(tree, page_size), page_size, _planner.PIECES)
