"""A brute-force oracle for plans, in plain Python over the CSR table: what any correct plan of a table must
satisfy, whatever the planner's sizing choices.

A query's KV is its list of page slots ``(page id, tokens used)``: every page full but the last, which holds
``kv_last_page_len`` tokens. A plan is correct when
- it carries its own copy of the table, equal to the input;
- every query's slots are covered exactly once by the items it has rows in, and concatenating those items'
  slots in the query's partial-row (merge) order gives the query's list: root→leaf order;
- a query in one item writes directly (``row_dest == -1``, not merged); a query in several items owns a
  contiguous run of partial rows ``merge_ptr[m]:merge_ptr[m+1]`` (every partial row is written exactly once);
  a query with no KV is merged from no rows (stage 2 writes 0 / -inf);
- padding (fixed-capacity plans) reads and writes nothing;
- the stats equal the counts below.
"""

from __future__ import annotations

import numpy as np


def query_slots(indptr, indices, last_len, page_size) -> list[list[tuple[int, int]]]:
    """Per query, its ``(page id, tokens used)`` slots in order."""
    slots = []
    for q in range(len(last_len)):
        pages = [int(p) for p in indices[indptr[q] : indptr[q + 1]]]
        slots.append([(p, page_size) for p in pages[:-1]] + ([(pages[-1], int(last_len[q]))] if pages else []))
    return slots


def expected_stats(indptr, indices, last_len, page_size, share_prefixes=True) -> dict:
    """The counts a plan's stats must show: distinct and summed tokens, trie edges, table sizes."""
    slots = query_slots(indptr, indices, last_len, page_size)
    tokens_of_page: dict[int, int] = {}  # a page's distinct tokens: the largest prefix of it anyone reads
    for row in slots:
        for page, used in row:
            tokens_of_page[page] = max(tokens_of_page.get(page, 0), used)
    # Trie edges: every distinct set of queries that share a (non-empty) key prefix is one compressed edge.
    if share_prefixes:
        trie: dict = {}
        groups: dict[int, tuple[dict, list[int]]] = {}
        for q, row in enumerate(slots):
            node = trie
            for key in row:
                node = node.setdefault(key, {})
                groups.setdefault(id(node), (node, []))[1].append(q)
        trie_edges = len({tuple(qs) for _, qs in groups.values()})
    else:
        trie_edges = sum(1 for row in slots if row)
    return {
        "num_queries": len(slots),
        "unique_tokens": sum(tokens_of_page.values()),
        "naive_tokens": sum(used for row in slots for _, used in row),
        "trie_edges": trie_edges,
        "nnz": int(indptr[-1]) if len(indptr) else 0,
    }


def check_plan(pieces: dict, stats: dict, bounds: dict, table, page_size: int, *, share_prefixes=True) -> None:
    """Asserts that ``pieces`` (name -> int sequence, as the plan's tensors), ``stats`` and ``bounds``
    (``max_queries_per_item``, ``max_item_tokens``, ``max_page_id``) are a correct plan of ``table``
    (``indptr, indices, last_len``)."""
    indptr, indices, last_len = (np.asarray(a, dtype=np.int64) for a in table)
    p = {name: np.asarray(v, dtype=np.int64) for name, v in pieces.items()}
    n, nnz = len(last_len), len(indices)
    want = expected_stats(indptr, indices, last_len, page_size, share_prefixes)
    slots = query_slots(indptr, indices, last_len, page_size)

    # The plan's own table.
    assert np.array_equal(p["kv_indptr"], indptr) and np.array_equal(p["kv_last_page_len"], last_len)
    assert np.array_equal(p["kv_indices"][:nnz], indices) and not p["kv_indices"][nnz:].any()

    num_items, num_rows, num_merges = stats["work_items"], stats["rows"], stats["merge_queries"]
    # Padding: items without tokens or rows, rows that write nowhere, merge entries of no query and no rows.
    assert not p["item_num_tokens"][num_items:].any()
    assert (p["item_row_ptr"][num_items:] == num_rows).all() and len(p["item_row_ptr"]) == len(p["item_page_ptr"]) + 1
    assert (p["row_dest"][num_rows:] == -1).all()
    assert (p["merge_query"][num_merges:] == -1).all() and (p["merge_ptr"][num_merges:] == stats["partial_rows"]).all()

    covered: list[list[tuple[int, list]]] = [[] for _ in range(n)]  # per query: (dest, item slots)
    item_tokens, item_queries = [], []
    for item in range(num_items):
        first, tokens = int(p["item_page_ptr"][item]), int(p["item_num_tokens"][item])
        assert tokens > 0, f"item {item} reads nothing"
        num_pages = -(-tokens // page_size)
        assert 0 <= first and first + num_pages <= nnz, f"item {item} reads outside the table"
        piece = [(int(p["kv_indices"][first + k]), page_size) for k in range(num_pages)]
        piece[-1] = (piece[-1][0], tokens - (num_pages - 1) * page_size)
        lo, hi = int(p["item_row_ptr"][item]), int(p["item_row_ptr"][item + 1])
        assert 0 < hi - lo <= bounds["max_queries_per_item"], f"item {item}: {hi - lo} rows"
        for r in range(lo, hi):
            covered[int(p["row_query"][r])].append((int(p["row_dest"][r]), piece))
        item_tokens.append(tokens)
        item_queries.append(hi - lo)
    assert int(p["item_row_ptr"][0]) == 0 and int(p["item_row_ptr"][num_items]) == num_rows

    merge_query = p["merge_query"][:num_merges].tolist()
    merge_ptr = p["merge_ptr"][: num_merges + 1].tolist()
    assert len(set(merge_query)) == num_merges and merge_ptr[0] == 0
    dests = []
    for q in range(n):
        rows = covered[q]
        if len(rows) == 1:
            assert rows[0][0] == -1, f"query {q}: one item, so it writes its output directly"
            assert q not in merge_query
        else:
            m = merge_query.index(q)  # (raises if stage 2 never writes it)
            own = sorted(d for d, _ in rows)
            assert own == list(range(merge_ptr[m], merge_ptr[m + 1])), f"query {q}: partial rows {own}"
            dests += own
        in_merge_order = [s for _, piece in sorted(rows, key=lambda r: r[0]) for s in piece]
        assert in_merge_order == slots[q], f"query {q}: items do not cover its KV exactly once, root to leaf"
    assert sorted(dests) == list(range(stats["partial_rows"]))

    assert {k: stats[k] for k in want} == want
    assert stats["planned_tokens"] == sum(item_tokens)
    assert stats["direct_queries"] == sum(len(rows) == 1 for rows in covered)
    assert stats["max_queries_per_item"] == max(item_queries, default=1)
    assert bounds["max_queries_per_item"] >= stats["max_queries_per_item"]
    assert bounds["max_item_tokens"] == max(item_tokens, default=0)
    assert bounds["max_page_id"] == (int(indices.max()) if nnz else -1)


def check_tree_plan(plan, table, page_size: int, **kw) -> None:
    """:func:`check_plan` of a :class:`treeattn.TreePlan`."""
    from treeattn.plan import PLAN_TENSOR_FIELDS

    pieces = {name: getattr(plan, name).cpu().tolist() for name in PLAN_TENSOR_FIELDS}
    bounds = {name: getattr(plan, name) for name in ("max_queries_per_item", "max_item_tokens", "max_page_id")}
    check_plan(pieces, plan.stats, bounds, table, page_size, **kw)


def check_planner_result(result: dict, table, page_size: int, pieces_order, **kw) -> None:
    """:func:`check_plan` of a raw ``treeattn._planner`` result."""
    split = np.split(np.asarray(result["packed"]), np.cumsum(result["piece_sizes"])[:-1])
    check_plan(dict(zip(pieces_order, split)), result["stats"], result, table, page_size, **kw)


def table_of_tree(tree: dict, page_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR table of a forest in ``plan_from_tree``'s form: a node's path is its parent's, cut where its
    own pages begin, then its pages (a node without tokens keeps its parent's); query q reads its owner's
    path up to ``query_end[q]``."""
    paths: dict[int, list[int]] = {}

    def path(m):
        if m not in paths:
            pages = list(tree["pages"][m])
            base = [] if tree["parent"][m] < 0 else path(tree["parent"][m])
            paths[m] = base[: tree["start"][m] // page_size] + pages if pages else base
        return paths[m]

    rows, last = [], []
    for m, e in zip(tree["query_owner"], tree["query_end"]):
        count = -(-e // page_size)
        rows.append(path(m)[:count] if m >= 0 else [])
        last.append(e - (count - 1) * page_size if count else 0)
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
    return indptr, np.asarray([p for r in rows for p in r], dtype=np.int32), np.asarray(last, dtype=np.int32)


def random_forest(rng, page_size: int, num_nodes: int, extra_queries: int = 0, empty_queries: int = 0) -> dict:
    """A random forest in ``plan_from_tree``'s form (parents before children). Pages are allocated as a
    copy-on-write cache does: a node starting mid-page continues its parent's last page in place (the first
    such child) or in a fresh copy; page ids are distinct random int32s. Every leaf owns a query at its end;
    ``extra_queries`` more end inside random nodes, ``empty_queries`` have no KV; queries are shuffled."""
    from array import array

    parent, length = [-1], [int(rng.integers(0, 3 * page_size + 2))]
    for m in range(1, num_nodes):
        parent.append(int(rng.integers(-1, m)) if rng.random() < 0.9 else -1)
        edges = [0, 1, page_size - 1, page_size, page_size + 1, int(rng.integers(0, 3 * page_size))]
        length.append(int(rng.choice(edges)))
    has_kids = set(parent)
    for m in range(num_nodes):  # every leaf holds tokens, so it can own its query
        if m not in has_kids and length[m] == 0:
            length[m] = 1
    ids = iter(rng.choice(2**31 - 1, size=4 * sum(length) // page_size + 4 * num_nodes + 8, replace=False).tolist())
    start, end, pages, path, continued = [], [], [], [], set()
    for m in range(num_nodes):
        s = 0 if parent[m] < 0 else end[parent[m]]
        e = s + length[m]
        base = [] if parent[m] < 0 else path[parent[m]]
        own = []
        for index in range(s // page_size, -(-e // page_size)) if e > s else []:
            in_place = index == s // page_size and s % page_size and index < len(base)
            if in_place and base[index] not in continued:
                continued.add(base[index])
                own.append(base[index])
            else:
                own.append(next(ids))
        start.append(s)
        end.append(e)
        pages.append(array("i", own))
        path.append(base[: s // page_size] + own if own else base)
    owner = [m for m in range(num_nodes) if m not in has_kids]
    query_end = [end[m] for m in owner]
    for _ in range(extra_queries):
        m = int(rng.integers(0, num_nodes))
        if end[m] > start[m]:
            owner.append(m)
            query_end.append(int(rng.integers(start[m] + 1, end[m] + 1)))
    owner += [-1] * empty_queries
    query_end += [0] * empty_queries
    order = rng.permutation(len(owner)).tolist()
    return dict(parent=parent, start=start, end=end, pages=pages, query_owner=[owner[i] for i in order],
                query_end=[query_end[i] for i in order])
