"""The numpy planner: the reference twin of csrc/planner.cpp (treeattn._planner) and its fallback.

Every function here mirrors the C++ line for line and both must produce bit-identical plans
(tests/test_planner_cpp.py); ``TREEATTN_PLANNER=numpy`` makes :func:`treeattn.plan` use this one. The sizing
policy (rows per item, chunk length, programs per SM) lives here and is passed to the C++ as arguments.
"""

from __future__ import annotations

import bisect

import numpy as np

# Stage-1 M tile (queries x heads of one KV head) the planner aims for; 64 rows keep the fp32 accumulator
# of a 128-wide head in registers.
_TARGET_ROWS_PER_ITEM = 64
# Partial-state traffic of an item is ~2 * rows / chunk_tokens of its KV traffic; 16 tokens per row keeps
# it under ~12% (DESIGN §3.1).
_TOKENS_PER_PARTIAL_ROW = 16
_MIN_CHUNK_TOKENS = 128
# Stage-1 programs to aim for per SM so that uneven items still fill the machine.
_PROGRAMS_PER_SM = 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _sizing(num_qo_heads: int | None, num_kv_heads: int | None) -> tuple[int, int]:
    """(rows per query = GQA group, KV heads) the plan sizes blocks and chunks for; GQA 32/8 by default."""
    group = 4 if not (num_qo_heads and num_kv_heads) else max(1, num_qo_heads // num_kv_heads)
    return group, num_kv_heads or 8


def _lexicographic_order(keys: np.ndarray, indptr: np.ndarray, num_queries: int) -> np.ndarray:
    """Query order that sorts page-key lists lexicographically (memcmp on big-endian keys)."""
    big_endian = keys.astype(">u8").tobytes()
    starts, ends = (indptr[:-1] * 8).tolist(), (indptr[1:] * 8).tolist()
    order = sorted(range(num_queries), key=lambda i: big_endian[starts[i] : ends[i]])
    return np.asarray(order, dtype=np.int64)


def _neighbour_lcp(keys: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """LCP (in pages) of each sorted query with its predecessor; ``lcp[0] = 0``. O(nnz), vectorised."""
    n = lengths.shape[0]
    lcp = np.zeros(n + 1, dtype=np.int64)  # lcp[n] = 0 closes the last interval
    if n < 2:
        return lcp
    common = np.minimum(lengths[:-1], lengths[1:])
    # Only neighbours whose first pages agree can share more than nothing: compare those in full.
    pairs = np.nonzero(common)[0]
    pairs = pairs[keys[starts[pairs]] == keys[starts[pairs + 1]]]
    if pairs.size == 0:
        return lcp
    counts = common[pairs]
    seg_start = np.cumsum(counts) - counts
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(seg_start, counts)
    left = np.repeat(starts[pairs], counts) + k
    right = np.repeat(starts[pairs + 1], counts) + k
    first_diff = np.where(keys[left] != keys[right], k, np.iinfo(np.int64).max)
    lcp[pairs + 1] = np.minimum(np.minimum.reduceat(first_diff, seg_start), counts)
    return lcp


def _trie_edges(lcp: np.ndarray, lengths: np.ndarray):
    """Compressed-trie edges as (depth_begin, depth_end, lo, hi): pages [depth_begin, depth_end) of the
    sorted queries lo..hi-1, shared by exactly those queries."""
    d0, d1, lo, hi = [], [], [], []
    # Internal edges: the LCP intervals (stack walk over the LCP array, O(n)).
    stack_lcp, stack_lb = [0], [0]
    for i, value in enumerate(lcp[1:].tolist(), start=1):
        lb = i - 1
        while value < stack_lcp[-1]:
            top = stack_lcp.pop()
            lb = stack_lb.pop()
            d0.append(max(value, stack_lcp[-1]))
            d1.append(top)
            lo.append(lb)
            hi.append(i)
        if value > stack_lcp[-1]:
            stack_lcp.append(value)
            stack_lb.append(lb)
    # Leaf edges: what each query does not share with either neighbour.
    leaf_begin = np.maximum(lcp[:-1], lcp[1:])
    leaves = np.nonzero(lengths > leaf_begin)[0]
    d0 = np.concatenate([np.asarray(d0, np.int64), leaf_begin[leaves]])
    d1 = np.concatenate([np.asarray(d1, np.int64), lengths[leaves]])
    lo = np.concatenate([np.asarray(lo, np.int64), leaves])
    hi = np.concatenate([np.asarray(hi, np.int64), leaves + 1])
    return d0, d1, lo, hi


def _ceil_div(a, b):
    return -(-a // b)


def _plan_table_numpy(indptr, indices, last_len, page_size, num_pages, share_prefixes, group, kv_heads, num_sms):
    """Table -> plan arrays in numpy: ``(packed int32, piece sizes, stats, max_item_tokens, max_page_id)``."""
    indptr = indptr.astype(np.int64)
    last_len = last_len.astype(np.int64)
    num_queries = last_len.shape[0]
    nnz = indices.shape[0]
    _check_table(indptr, indices, last_len, nnz, page_size, None if num_pages < 0 else num_pages)

    lengths = np.diff(indptr)
    has_pages = lengths > 0
    # Tokens each page slot contributes: full pages, except each query's last page.
    used = np.full(nnz, page_size, dtype=np.int64)
    used[indptr[1:][has_pages] - 1] = last_len[has_pages]
    keys = indices.astype(np.int64) * (page_size + 1) + used

    order = _lexicographic_order(keys, indptr, num_queries)
    sorted_lengths = lengths[order]
    sorted_starts = indptr[:-1][order]
    if share_prefixes:
        lcp = _neighbour_lcp(keys, sorted_starts, sorted_lengths)
    else:
        lcp = np.zeros(num_queries + 1, dtype=np.int64)
    e_d0, e_d1, e_lo, e_hi = _trie_edges(lcp, sorted_lengths)

    edge_first_page = sorted_starts[e_lo] + e_d0
    edge_tail = page_size - used[sorted_starts[e_lo] + e_d1 - 1]  # unused slots of the edge's last page
    return _items_from_edges(
        order, e_lo, e_hi, e_d0, e_d1 - e_d0, edge_first_page, edge_tail, indices, used, page_size, group,
        kv_heads, num_sms,
    )


def _plan_tree_numpy(parent, start, end, pages, query_owner, query_end, page_size, group, kv_heads, num_sms):
    """Tree -> plan arrays + table in numpy (csrc/planner.cpp's plan_tree mirrors the walk line for line):
    ``(packed int32, piece sizes, stats, max_item_tokens, max_page_id, kv_indptr, kv_indices, kv_last_page_len)``.
    The stats count tokens on the table (as :func:`plan` does), an independent check of the C++ count."""
    s = page_size
    parent, start, end, owner, q_end = (np.asarray(a, dtype=np.int64).reshape(-1) for a in
                                        (parent, start, end, query_owner, query_end))
    pages = [np.asarray(p, dtype=np.int32).reshape(-1) for p in pages]
    _check_tree(parent, start, end, pages, owner, q_end, s)
    num_nodes, num_queries = parent.shape[0], owner.shape[0]
    kids: list[list[int]] = [[] for _ in range(num_nodes)]
    roots: list[int] = []
    for m, p in enumerate(parent.tolist()):
        (kids[p] if p >= 0 else roots).append(m)
    own: list[list[tuple[int, int]]] = [[] for _ in range(num_nodes)]  # node -> [(end, query)]
    for q, (m, e) in enumerate(zip(owner.tolist(), q_end.tolist())):
        if m >= 0:
            own[m].append((e, q))

    # Depth-first order of the queries: a node's subtree is contiguous, its descendants' queries first,
    # then its own by decreasing end. Each node yields trie segments (page-depth range, query range);
    # segments with the same query range chain along one path and merge into one edge.
    order: list[int] = []
    edges: dict[tuple[int, int], list[int]] = {}  # (lo, hi) -> [depth_begin, depth_end, tail]

    def add_segment(lo, hi, d0, d1, tail):
        cur = edges.get((lo, hi))
        if cur is None:
            edges[(lo, hi)] = [d0, d1, tail]
        else:
            if d0 < cur[0]:
                cur[0] = d0
            if d1 > cur[1]:
                cur[1], cur[2] = d1, tail

    stack = [(r, -1) for r in reversed(roots)]
    entered = 0
    while stack:
        m, lo = stack.pop()
        if lo < 0:
            entered += 1
            if kids[m]:
                stack.append((m, len(order)))
                stack.extend((c, -1) for c in reversed(kids[m]))
                continue
            lo = len(order)
        desc_end = len(order)
        a, b = int(start[m]) // s, int(end[m]) // s
        mine = own[m]
        if desc_end == lo and len(mine) == 1:  # a leaf of one query (the usual case)
            e, q = mine[0]
            order.append(q)
            f, rest = divmod(e, s)
            if rest:
                add_segment(lo, lo + 1, a, f + 1, s - rest)
            elif a < f:
                add_segment(lo, lo + 1, a, f, 0)
            continue
        if not mine:  # a shared ancestor: all its full pages go to every descendant
            if a < b:
                add_segment(lo, desc_end, a, b, 0)
            continue
        mine.sort(key=lambda t: (-t[0], t[1]))
        order.extend([q for _, q in mine])
        # Full pages [a, b): every descendant reads them all, an own query of end e reads [a, e // s).
        fulls_asc = [e // s for e, _ in reversed(mine)]
        if fulls_asc[0] >= b:  # every own query reads them all (the usual leaf)
            if a < b:
                add_segment(lo, desc_end + len(mine), a, b, 0)
        else:
            cuts = sorted({a, b, *(f for f in fulls_asc if a < f < b)})
            for u, v in zip(cuts, cuts[1:]):
                hi = desc_end + len(fulls_asc) - bisect.bisect_right(fulls_asc, u)
                if hi > lo:
                    add_segment(lo, hi, u, v, 0)
        # Partial last pages of own queries: one edge per run of equal ends.
        i = 0
        while i < len(mine):
            e = mine[i][0]
            j = i + 1
            while j < len(mine) and mine[j][0] == e:
                j += 1
            if e % s:
                add_segment(desc_end + i, desc_end + j, e // s, e // s + 1, s - e % s)
            i = j
    if entered != num_nodes:  # nodes on a parent cycle lead to no root
        raise ValueError("parent: expected a forest (every node leads to a root), got a cycle")
    for m, p in enumerate(pages):
        if p.size and p.min() < 0:
            raise ValueError(f"pages: expected page ids >= 0, got {int(p.min())} in node {m}")
    order.extend(np.nonzero(owner < 0)[0].tolist())

    # The table: a node's path is its parent's cut where its own pages begin, then its pages (a node without
    # tokens keeps its parent's), built from the roots down.
    paths: list[np.ndarray] = [np.zeros(0, np.int32)] * num_nodes
    todo = [(r, np.zeros(0, np.int32)) for r in roots]
    while todo:
        m, base = todo.pop()
        paths[m] = np.concatenate([base[: start[m] // s], pages[m]]) if pages[m].size else base
        todo.extend((c, paths[m]) for c in kids[m])
    q_pages = -(-q_end // s)
    indptr = np.zeros(num_queries + 1, dtype=np.int64)
    np.cumsum(q_pages, out=indptr[1:])
    rows = [paths[m][:n] for m, n in zip(owner.tolist(), q_pages.tolist()) if m >= 0]
    indices = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    has_pages = q_pages > 0
    last_len = np.where(has_pages, q_end - (q_pages - 1) * s, 0)
    used = np.full(indices.shape[0], s, dtype=np.int64)
    used[indptr[1:][has_pages] - 1] = last_len[has_pages]

    order_arr = np.asarray(order, dtype=np.int64)
    lo_hi = np.asarray(list(edges.keys()), dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(list(edges.values()), dtype=np.int64).reshape(-1, 3)
    e_lo, e_hi, e_d0, e_d1 = lo_hi[:, 0], lo_hi[:, 1], spans[:, 0], spans[:, 1]
    arrays = _items_from_edges(
        order_arr, e_lo, e_hi, e_d0, e_d1 - e_d0, indptr[order_arr[e_lo]] + e_d0, spans[:, 2], indices, used, s,
        group, kv_heads, num_sms,
    )
    return (*arrays, indptr.astype(np.int32), indices.astype(np.int32), last_len.astype(np.int32))


def _check_tree(parent, start, end, pages, owner, q_end, page_size):
    """plan_from_tree's contract but the forest shape (the walk checks it) and page ids (checked after it), with
    the C++ planner's messages."""
    num_nodes = parent.shape[0]
    if not (start.shape[0] == end.shape[0] == len(pages) == num_nodes):
        raise ValueError(
            f"tree: expected parent, start, end and pages of one length (one entry per node), got {num_nodes}, "
            f"{start.shape[0]}, {end.shape[0]}, {len(pages)}"
        )
    if q_end.shape[0] != owner.shape[0]:
        raise ValueError(f"query_end: expected one entry per query ({owner.shape[0]}), got {q_end.shape[0]}")
    if page_size < 1:
        raise ValueError(f"page_size: expected a positive int, got {page_size}")
    for m in range(num_nodes):
        p = int(parent[m])
        if not -1 <= p < num_nodes or p == m:
            raise ValueError(f"parent: expected -1 or another node's index < {num_nodes} for node {m}, got {p}")
        begin = 0 if p < 0 else int(end[p])
        if start[m] != begin:
            raise ValueError(
                f"start: expected {begin} for node {m} (a root starts at 0, a child where its parent ends), got {int(start[m])}"
            )
        if end[m] < start[m]:
            raise ValueError(f"end: expected >= start={int(start[m])} for node {m}, got {int(end[m])}")
        want = -(-int(end[m]) // page_size) - int(start[m]) // page_size if end[m] > start[m] else 0
        if pages[m].shape[0] != want:
            raise ValueError(
                f"pages: expected {want} page ids for node {m} (path positions [{int(start[m])}, {int(end[m])}) at "
                f"page_size {page_size}), got {pages[m].shape[0]}"
            )
    for q, (m, e) in enumerate(zip(owner.tolist(), q_end.tolist())):
        if not -1 <= m < num_nodes:
            raise ValueError(f"query_owner: expected -1 or a node index < {num_nodes} for query {q}, got {m}")
        if m < 0 and e != 0:
            raise ValueError(f"query_end: expected 0 (no owner) for query {q}, got {e}")
        if m >= 0 and not start[m] < e <= end[m]:
            raise ValueError(
                f"query_end: expected start < query_end <= end of node {m} ({int(start[m])}, {int(end[m])}] for "
                f"query {q}, got {e}"
            )


def _items_from_edges(
    order, e_lo, e_hi, e_d0, edge_pages, edge_first_page, edge_tail, indices, used, page_size, group, kv_heads, num_sms
):
    """Edges -> items, rows, merge CSR and stats (numpy; csrc/planner.cpp mirrors it line for line)."""
    num_queries = order.shape[0]
    nnz = indices.shape[0]

    # Query blocks: rows = queries x padded GQA group, aiming at a 64-row M tile.
    block_q = max(1, _TARGET_ROWS_PER_ITEM // _next_pow2(group))
    edge_queries = e_hi - e_lo
    edge_blocks = _ceil_div(edge_queries, block_q)
    edge_tokens = edge_pages * page_size - edge_tail

    # Chunk length: long enough that partial-state traffic stays small, short enough to fill the GPU.
    rows_per_block = _ceil_div(edge_queries, edge_blocks) * group
    total_work = int((edge_tokens * edge_blocks).sum())
    balanced = _ceil_div(total_work, max(1, _PROGRAMS_PER_SM * num_sms // kv_heads))
    chunk_tokens = np.maximum(np.maximum(rows_per_block * _TOKENS_PER_PARTIAL_ROW, balanced), _MIN_CHUNK_TOKENS)
    edge_chunks = _ceil_div(edge_pages, np.maximum(1, chunk_tokens // page_size))
    chunk_pages = _ceil_div(edge_pages, edge_chunks)

    # Items: (edge, query block, chunk), edge-major so one edge's items are neighbours in the grid.
    items_per_edge = edge_blocks * edge_chunks
    num_edges = e_lo.shape[0]
    item_edge = np.repeat(np.arange(num_edges), items_per_edge)
    local = np.arange(item_edge.shape[0]) - np.repeat(np.cumsum(items_per_edge) - items_per_edge, items_per_edge)
    item_block = local // edge_chunks[item_edge]
    item_chunk = local % edge_chunks[item_edge]
    item_page_begin = item_chunk * chunk_pages[item_edge]
    item_pages = np.minimum(chunk_pages[item_edge], edge_pages[item_edge] - item_page_begin)
    item_page_ptr = edge_first_page[item_edge] + item_page_begin
    is_edge_tail = item_page_begin + item_pages == edge_pages[item_edge]
    item_num_tokens = item_pages * page_size - np.where(is_edge_tail, edge_tail[item_edge], 0)
    item_depth = e_d0[item_edge] + item_page_begin
    # Balanced query blocks: block b of an edge holds sorted queries [lo + b*q//nb, lo + (b+1)*q//nb).
    q_cnt, nb = edge_queries[item_edge], edge_blocks[item_edge]
    block_lo = e_lo[item_edge] + item_block * q_cnt // nb
    block_hi = e_lo[item_edge] + (item_block + 1) * q_cnt // nb
    item_rows = block_hi - block_lo
    item_row_ptr = np.concatenate([[0], np.cumsum(item_rows)])
    num_rows = int(item_row_ptr[-1])
    row_item = np.repeat(np.arange(item_rows.shape[0]), item_rows)
    row_sorted_query = block_lo[row_item] + np.arange(num_rows) - item_row_ptr[:-1][row_item]
    row_query = order[row_sorted_query]
    row_depth = item_depth[row_item]

    # Queries with one row write their output directly; the rest merge partials in root→leaf order.
    rows_per_query = np.bincount(row_query, minlength=num_queries)
    merged_rows = rows_per_query[row_query] > 1
    partial_rows = np.nonzero(merged_rows)[0]
    partial_rows = partial_rows[np.lexsort((row_depth[partial_rows], row_query[partial_rows]))]
    row_dest = np.full(num_rows, -1, dtype=np.int64)
    row_dest[partial_rows] = np.arange(partial_rows.shape[0])
    merge_query = np.nonzero(rows_per_query != 1)[0]
    merge_ptr = np.concatenate([[0], np.cumsum(rows_per_query[merge_query])])

    max_q = int(item_rows.max()) if item_rows.size else 1
    max_item_tokens = int(item_num_tokens.max()) if item_num_tokens.size else 0
    stats = {
        "num_queries": num_queries,
        "unique_tokens": _unique_tokens(indices, used, page_size),
        "naive_tokens": int(used.sum()),
        "planned_tokens": int(item_num_tokens.sum()),
        "work_items": int(item_rows.shape[0]),
        "trie_edges": int(num_edges),
        "partial_rows": int(partial_rows.shape[0]),
        "direct_queries": int((rows_per_query == 1).sum()),
        "max_queries_per_item": max_q,
    }

    pieces = [item_page_ptr, item_num_tokens, item_row_ptr, row_query, row_dest, merge_query, merge_ptr]
    packed = np.concatenate(pieces).astype(np.int32)
    max_page_id = int(indices.max()) if nnz else -1
    return packed, [p.shape[0] for p in pieces], stats, max_item_tokens, max_page_id


def _unique_tokens(indices: np.ndarray, used: np.ndarray, page_size: int) -> int:
    """Distinct (page, slot) tokens: a page read by several queries counts its largest used prefix once."""
    if indices.size == 0:
        return 0
    tokens = np.zeros(int(indices.max()) + 1, dtype=np.int64)
    partial = used < page_size
    np.maximum.at(tokens, indices[partial], used[partial])
    tokens[indices[~partial]] = page_size  # a full use of a page covers every partial use of it
    return int(tokens.sum())


def _check_table(indptr, indices, last_len, nnz, page_size, num_pages):
    if indptr[0] != 0:
        raise ValueError(f"kv_indptr: expected kv_indptr[0] == 0, got {int(indptr[0])}")
    steps = np.diff(indptr)
    if (steps < 0).any():
        bad = int(np.nonzero(steps < 0)[0][0])
        raise ValueError(
            f"kv_indptr: expected non-decreasing values, got kv_indptr[{bad}]={int(indptr[bad])} > "
            f"kv_indptr[{bad + 1}]={int(indptr[bad + 1])}"
        )
    if indptr[-1] != nnz:
        raise ValueError(f"kv_indptr: expected kv_indptr[-1] == len(kv_indices) == {nnz}, got {int(indptr[-1])}")
    if nnz:
        low, high = int(indices.min()), int(indices.max())
        if low < 0:
            raise ValueError(f"kv_indices: expected page ids >= 0, got {low}")
        if num_pages is not None and high >= num_pages:
            raise ValueError(f"kv_indices: expected page ids < num_pages={num_pages}, got {high}")
    has_pages = steps > 0
    bad = has_pages & ((last_len < 1) | (last_len > page_size))
    if bad.any():
        q = int(np.nonzero(bad)[0][0])
        raise ValueError(
            f"kv_last_page_len: expected 1..page_size={page_size} for query {q} (it has pages), got {int(last_len[q])}"
        )
