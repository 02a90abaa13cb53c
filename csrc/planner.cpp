// Host planner of treeattn (pybind11 module treeattn._planner): the C++ twin of the numpy planner in
// python/treeattn/plan.py. Both produce identical plans (tests/test_planner_cpp.py checks it); this one
// meets the DESIGN §4 host budget (<= 200 us for 256 queries x 8k tokens at page size 16).
//
// Two entry points, one back end:
// - plan_table (treeattn.plan): validate the CSR table; key every page slot by (page id, tokens used); sort
//   queries lexicographically by key lists (multikey radix sort that skips common runs with memcmp); LCPs of
//   neighbours; LCP-interval stack walk -> compressed-trie edges.
// - plan_tree (TreeKVCache.plan): the cache knows its tree, so the edges come from a walk of the queried
//   subtree (O(nodes + queries): no sorting, no page comparisons) and the table is written from the nodes'
//   page lists.
// Back end (build_items): edges -> chunks x query blocks -> work items, rows, partial-state rows
// (root->leaf per query) and the stage-2 merge CSR, packed into one int32 buffer in the order
// python/treeattn/plan.py unpacks it.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using i64 = int64_t;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

struct Table {
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_len;
  i64 num_queries;
  i64 nnz;
  i64 page_size;
};

std::string str(i64 v) { return std::to_string(v); }

// Validates the table; returns the largest page id (-1 when there are no pages).
i64 check_table(const Table& t, i64 num_pages) {
  if (t.indptr[0] != 0)
    throw std::invalid_argument("kv_indptr: expected kv_indptr[0] == 0, got " + str(t.indptr[0]));
  for (i64 i = 0; i < t.num_queries; ++i) {
    if (t.indptr[i + 1] < t.indptr[i])
      throw std::invalid_argument("kv_indptr: expected non-decreasing values, got kv_indptr[" + str(i) + "]=" +
                                  str(t.indptr[i]) + " > kv_indptr[" + str(i + 1) + "]=" + str(t.indptr[i + 1]));
  }
  if (t.indptr[t.num_queries] != t.nnz)
    throw std::invalid_argument("kv_indptr: expected kv_indptr[-1] == len(kv_indices) == " + str(t.nnz) + ", got " +
                                str(t.indptr[t.num_queries]));
  int32_t high = -1;
  if (t.nnz) {
    int32_t low = t.indices[0];
    high = t.indices[0];
    for (i64 j = 1; j < t.nnz; ++j) {
      low = std::min(low, t.indices[j]);
      high = std::max(high, t.indices[j]);
    }
    if (low < 0) throw std::invalid_argument("kv_indices: expected page ids >= 0, got " + str(low));
    if (num_pages >= 0 && high >= num_pages)
      throw std::invalid_argument("kv_indices: expected page ids < num_pages=" + str(num_pages) + ", got " + str(high));
  }
  for (i64 i = 0; i < t.num_queries; ++i) {
    if (t.indptr[i + 1] > t.indptr[i] && (t.last_len[i] < 1 || t.last_len[i] > t.page_size))
      throw std::invalid_argument("kv_last_page_len: expected 1..page_size=" + str(t.page_size) + " for query " +
                                  str(i) + " (it has pages), got " + str(t.last_len[i]));
  }
  return high;
}

// Length of the common prefix of a[0:n) and b[0:n): memcmp over blocks, then a scan of the differing block.
i64 common_prefix(const int32_t* a, const int32_t* b, i64 n) {
  constexpr i64 kBlock = 64;
  i64 k = 0;
  while (k + kBlock <= n && std::memcmp(a + k, b + k, kBlock * sizeof(int32_t)) == 0) k += kBlock;
  while (k < n && a[k] == b[k]) ++k;
  return k;
}

// The trie key of a page slot is (page id, tokens used); only a list's last slot can use fewer than
// page_size tokens, so keys are compared as page ids plus, at a list's last slot, its used count.
struct Keys {
  const Table& t;
  i64 used(i64 q, i64 d) const { return d == t.indptr[q + 1] - t.indptr[q] - 1 ? t.last_len[q] : t.page_size; }
  i64 length(i64 q) const { return t.indptr[q + 1] - t.indptr[q]; }
  // Key of query q at depth d, or -1 when q's list ends before d (shorter lists sort first).
  i64 at(i64 q, i64 d) const {
    return d < length(q) ? static_cast<i64>(t.indices[t.indptr[q] + d]) * (t.page_size + 1) + used(q, d) : -1;
  }
  // Common key prefix of queries a and b from depth `from`, at most `limit` slots.
  i64 common(i64 a, i64 b, i64 from, i64 limit) const {
    i64 k = common_prefix(t.indices + t.indptr[a] + from, t.indices + t.indptr[b] + from, limit);
    // A page id match at either list's last slot still needs equal used counts.
    while (k > 0 && used(a, from + k - 1) != used(b, from + k - 1)) k = k - 1;
    return k;
  }
};

struct Sorter {
  const Keys& keys;

  // Sorts order[lo:hi) lexicographically given that all of them agree on depths [0, depth); stable.
  void sort(std::vector<i64>& order, i64 lo, i64 hi, i64 depth) const {
    while (hi - lo > 1) {
      // Skip the run that every member shares from `depth` on (one memcmp per member).
      i64 first = order[lo];
      i64 shared = keys.length(first) - std::min(depth, keys.length(first));
      for (i64 i = lo + 1; i < hi && shared > 0; ++i) {
        i64 q = order[i];
        shared = keys.common(first, q, depth, std::min(shared, keys.length(q) - std::min(depth, keys.length(q))));
      }
      depth += shared;
      std::stable_sort(order.begin() + lo, order.begin() + hi,
                       [&](i64 a, i64 b) { return keys.at(a, depth) < keys.at(b, depth); });
      // Recurse into every group of equal keys but the last; loop on the last (bounded stack on deep chains).
      i64 group_lo = lo;
      for (i64 i = lo + 1; i < hi; ++i) {
        if (keys.at(order[i], depth) != keys.at(order[group_lo], depth)) {
          if (keys.at(order[group_lo], depth) >= 0) sort(order, group_lo, i, depth + 1);
          group_lo = i;
        }
      }
      if (keys.at(order[group_lo], depth) < 0) return;  // lists that all ended: identical, already stable
      lo = group_lo;
      depth += 1;
    }
  }
};

// Compressed-trie edges: edge k is pages [depth, depth + pages) of the sorted queries lo..hi-1, stored at
// kv_indices[first_page : first_page + pages], with `tail` unused slots in its last page.
struct Edges {
  std::vector<i64> lo, hi, depth, pages, first_page, tail;
};

i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
i64 next_pow2(i64 x) {
  i64 p = 1;
  while (p < x) p <<= 1;
  return p;
}

struct Sizing {
  i64 group, kv_heads, num_sms, target_rows, tokens_per_partial_row, min_chunk_tokens, programs_per_sm;
};

// Edges -> chunks x query blocks -> items, rows, partial rows (root->leaf per query), merge CSR; mirrors
// _items_from_edges in plan.py exactly. Returns (packed int32, piece sizes, stats, max_item_tokens); the
// caller adds the table's unique_tokens / naive_tokens to the stats.
py::tuple build_items(const std::vector<i64>& order, const Edges& e, i64 ps, const Sizing& s) {
  const i64 block_q = std::max<i64>(1, s.target_rows / next_pow2(s.group));
  const i64 n = static_cast<i64>(order.size()), num_edges = static_cast<i64>(e.lo.size());
  const std::vector<i64>&efirst = e.first_page, &epages = e.pages, &etail = e.tail;
  std::vector<i64> eq(num_edges), eb(num_edges), echunks(num_edges), echunk_pages(num_edges);
  i64 total_work = 0;
  for (i64 k = 0; k < num_edges; ++k) {
    eq[k] = e.hi[k] - e.lo[k];
    eb[k] = ceil_div(eq[k], block_q);
    total_work += (epages[k] * ps - etail[k]) * eb[k];
  }
  const i64 balanced = ceil_div(total_work, std::max<i64>(1, s.programs_per_sm * s.num_sms / s.kv_heads));
  i64 num_items = 0;
  for (i64 k = 0; k < num_edges; ++k) {
    i64 rows_per_block = ceil_div(eq[k], eb[k]) * s.group;
    i64 chunk_tokens = std::max({rows_per_block * s.tokens_per_partial_row, balanced, s.min_chunk_tokens});
    echunks[k] = ceil_div(epages[k], std::max<i64>(1, chunk_tokens / ps));
    echunk_pages[k] = ceil_div(epages[k], echunks[k]);
    num_items += eb[k] * echunks[k];
  }

  std::vector<i64> item_page_ptr, item_tokens, item_row_ptr{0}, row_query, row_depth;
  item_page_ptr.reserve(num_items);
  item_tokens.reserve(num_items);
  item_row_ptr.reserve(num_items + 1);
  i64 planned_tokens = 0, max_q = 0, max_item_tokens = 0;
  for (i64 k = 0; k < num_edges; ++k) {
    for (i64 b = 0; b < eb[k]; ++b) {
      i64 block_lo = e.lo[k] + b * eq[k] / eb[k], block_hi = e.lo[k] + (b + 1) * eq[k] / eb[k];
      for (i64 c = 0; c < echunks[k]; ++c) {
        i64 page_begin = c * echunk_pages[k];
        i64 pages = std::min(echunk_pages[k], epages[k] - page_begin);
        i64 tokens = pages * ps - (page_begin + pages == epages[k] ? etail[k] : 0);
        item_page_ptr.push_back(efirst[k] + page_begin);
        item_tokens.push_back(tokens);
        planned_tokens += tokens;
        max_item_tokens = std::max(max_item_tokens, tokens);
        for (i64 q = block_lo; q < block_hi; ++q) {
          row_query.push_back(order[q]);
          row_depth.push_back(e.depth[k] + page_begin);
        }
        item_row_ptr.push_back(static_cast<i64>(row_query.size()));
        max_q = std::max(max_q, block_hi - block_lo);
      }
    }
  }
  const i64 num_rows = static_cast<i64>(row_query.size());

  // Queries with one row write directly; the others' rows become partial rows, by (query, depth).
  std::vector<i64> rows_per_query(n, 0);
  for (i64 r = 0; r < num_rows; ++r) rows_per_query[row_query[r]]++;
  std::vector<i64> partial;
  for (i64 r = 0; r < num_rows; ++r)
    if (rows_per_query[row_query[r]] > 1) partial.push_back(r);
  std::stable_sort(partial.begin(), partial.end(), [&](i64 a, i64 b) {
    return row_query[a] != row_query[b] ? row_query[a] < row_query[b] : row_depth[a] < row_depth[b];
  });
  std::vector<i64> row_dest(num_rows, -1);
  for (i64 k = 0; k < static_cast<i64>(partial.size()); ++k) row_dest[partial[k]] = k;
  std::vector<i64> merge_query, merge_ptr{0};
  i64 direct = 0;
  for (i64 q = 0; q < n; ++q) {
    if (rows_per_query[q] == 1) {
      ++direct;
    } else {
      merge_query.push_back(q);
      merge_ptr.push_back(merge_ptr.back() + rows_per_query[q]);
    }
  }

  const std::vector<i64>* pieces[] = {&item_page_ptr, &item_tokens, &item_row_ptr, &row_query,
                                      &row_dest,      &merge_query, &merge_ptr};
  std::vector<i64> sizes;
  i64 total = 0;
  for (auto* p : pieces) {
    sizes.push_back(static_cast<i64>(p->size()));
    total += sizes.back();
  }
  IntArray packed(total);
  int32_t* out = packed.mutable_data();
  for (auto* p : pieces)
    for (i64 v : *p) *out++ = static_cast<int32_t>(v);

  py::dict stats;
  stats["num_queries"] = n;
  stats["planned_tokens"] = planned_tokens;
  stats["work_items"] = num_items;
  stats["trie_edges"] = num_edges;
  stats["partial_rows"] = static_cast<i64>(partial.size());
  stats["direct_queries"] = direct;
  stats["max_queries_per_item"] = max_q > 0 ? max_q : 1;
  return py::make_tuple(packed, sizes, stats, max_item_tokens);
}

py::tuple plan_table(IntArray kv_indptr, IntArray kv_indices, IntArray kv_last_page_len, i64 page_size,
                     i64 num_pages, bool share_prefixes, Sizing s) {
  Table t{kv_indptr.data(), kv_indices.data(), kv_last_page_len.data(), kv_last_page_len.shape(0),
          kv_indices.shape(0), page_size};
  if (kv_indptr.shape(0) != t.num_queries + 1)
    throw std::invalid_argument("kv_indptr: expected shape [" + str(t.num_queries + 1) +
                                "] (len(kv_last_page_len) + 1), got [" + str(kv_indptr.shape(0)) + "]");
  const i64 max_page = check_table(t, num_pages);
  const i64 n = t.num_queries, ps = page_size;

  const Keys keys{t};
  i64 naive_tokens = 0;
  for (i64 i = 0; i < n; ++i)
    if (keys.length(i) > 0) naive_tokens += (keys.length(i) - 1) * ps + t.last_len[i];
  // Distinct (page, slot) tokens: each page counts its largest used prefix once. A full use covers any
  // partial one, and only last slots are partial: a bitmap of fully used pages plus the few last pages.
  std::vector<uint8_t> full(max_page + 1, 0);
  std::vector<std::pair<i64, i64>> partial_pages;
  i64 num_full = 0;
  for (i64 i = 0; i < n; ++i) {
    i64 len = keys.length(i);
    if (len == 0) continue;
    const int32_t* pages = t.indices + t.indptr[i];
    const i64 full_len = t.last_len[i] == ps ? len : len - 1;
    for (i64 d = 0; d < full_len; ++d) {
      num_full += full[pages[d]] ^ 1;
      full[pages[d]] = 1;
    }
    if (full_len < len) partial_pages.emplace_back(pages[len - 1], t.last_len[i]);
  }
  i64 unique_tokens = ps * num_full;
  std::sort(partial_pages.begin(), partial_pages.end());
  for (size_t k = 0; k < partial_pages.size(); ++k) {
    bool last_of_page = k + 1 == partial_pages.size() || partial_pages[k + 1].first != partial_pages[k].first;
    if (last_of_page && !full[partial_pages[k].first]) unique_tokens += partial_pages[k].second;
  }

  std::vector<i64> order(n);
  std::iota(order.begin(), order.end(), 0);
  Sorter{keys}.sort(order, 0, n, 0);

  std::vector<i64> sstart(n), slen(n), lcp(n + 1, 0);
  for (i64 i = 0; i < n; ++i) {
    sstart[i] = t.indptr[order[i]];
    slen[i] = keys.length(order[i]);
  }
  if (share_prefixes) {
    for (i64 i = 1; i < n; ++i) {
      i64 common = std::min(slen[i - 1], slen[i]);
      if (common > 0 && keys.at(order[i - 1], 0) == keys.at(order[i], 0))
        lcp[i] = keys.common(order[i - 1], order[i], 0, common);
    }
  }

  std::vector<i64> d0, d1, elo, ehi;
  auto add_edge = [&](i64 a, i64 b, i64 l, i64 h) {
    d0.push_back(a);
    d1.push_back(b);
    elo.push_back(l);
    ehi.push_back(h);
  };
  std::vector<i64> stack_lcp{0}, stack_lb{0};
  for (i64 i = 1; i <= n; ++i) {
    i64 value = lcp[i], lb = i - 1;
    while (value < stack_lcp.back()) {
      i64 top = stack_lcp.back();
      stack_lcp.pop_back();
      lb = stack_lb.back();
      stack_lb.pop_back();
      add_edge(std::max(value, stack_lcp.back()), top, lb, i);
    }
    if (value > stack_lcp.back()) {
      stack_lcp.push_back(value);
      stack_lb.push_back(lb);
    }
  }
  for (i64 i = 0; i < n; ++i) {
    i64 leaf_begin = std::max(lcp[i], lcp[i + 1]);
    if (slen[i] > leaf_begin) add_edge(leaf_begin, slen[i], i, i + 1);
  }
  Edges e{elo, ehi, d0, {}, {}, {}};
  for (size_t k = 0; k < d0.size(); ++k) {
    e.pages.push_back(d1[k] - d0[k]);
    e.first_page.push_back(sstart[elo[k]] + d0[k]);
    e.tail.push_back(ps - keys.used(order[elo[k]], d1[k] - 1));
  }
  py::tuple items = build_items(order, e, ps, s);
  py::dict stats = items[2];
  stats["unique_tokens"] = unique_tokens;
  stats["naive_tokens"] = naive_tokens;
  return py::make_tuple(items[0], items[1], stats, items[3], max_page);
}

// Borrowed views of int32 buffers (array('i'), numpy int32: anything with the buffer protocol), so the cache's
// page lists are read in place; released on destruction. Reserved up front: PyBuffer_Release must get the
// Py_buffer that PyObject_GetBuffer filled, so the views never move.
class Int32Views {
 public:
  explicit Int32Views(const py::list& objects) {
    views_.reserve(objects.size());
    for (py::handle obj : objects) {
      views_.emplace_back();
      if (PyObject_GetBuffer(obj.ptr(), &views_.back(), PyBUF_ND | PyBUF_FORMAT) != 0) {
        views_.pop_back();
        release();
        throw py::error_already_set();
      }
      const Py_buffer& v = views_.back();
      const char kind = v.format ? v.format[std::strlen(v.format) - 1] : '?';
      if (v.ndim != 1 || v.itemsize != 4 || (kind != 'i' && kind != 'l')) {
        std::string got = "format '" + std::string(v.format ? v.format : "") + "' with " + str(v.ndim) +
                          " dims and itemsize " + str(v.itemsize);
        release();
        throw std::invalid_argument("pages: expected 1-D int32 buffers (array('i') or numpy int32), got " + got);
      }
    }
  }
  ~Int32Views() { release(); }
  Int32Views(const Int32Views&) = delete;
  Int32Views& operator=(const Int32Views&) = delete;

  const int32_t* data(i64 i) const { return static_cast<const int32_t*>(views_[i].buf); }
  i64 size(i64 i) const { return views_[i].len / 4; }

 private:
  void release() {
    for (Py_buffer& v : views_) PyBuffer_Release(&v);
    views_.clear();
  }
  std::vector<Py_buffer> views_;
};

// Largest of ids[0:read) (-1 if none) and the OR of ids[0:count), which is negative iff an id is. This pass
// over every page a step reads is plan_tree's largest own cost on little-sharing trees (longcot). Baseline
// x86-64 (SSE2) has no packed int32 max and takes four ops for one, so x86-64 glibc builds also carry an
// SSE4.1 (pmaxsd) clone, which the loader picks where the CPU has it (GCC/Clang function multiversioning;
// same results, 3x faster).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
__attribute__((target_clones("sse4.1", "default")))
#endif
int32_t max_id(const int32_t* ids, i64 read, i64 count, int32_t& bits) {
  int32_t high = -1, all = 0;
  for (i64 j = 0; j < read; ++j) {
    high = std::max(high, ids[j]);
    all |= ids[j];
  }
  for (i64 j = read; j < count; ++j) all |= ids[j];
  bits = all;
  return high;
}

// A sequence of ints (TreeKVCache.plan passes lists) as int64s: PySequence_Fast, then PyLong_AsLongLong per
// item, a few ns each (pybind's generic list caster costs several times that per item).
std::vector<i64> int64s(const py::handle& seq, const char* name) {
  py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(seq.ptr(), name));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  std::vector<i64> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) throw py::error_already_set();
  }
  return out;
}

// A forest of nodes (the part of a TreeKVCache that a step's queries reach) and the queries on it; see
// plan_from_tree in python/treeattn/plan.py for the contract.
struct Tree {
  const std::vector<i64>&parent, &start, &end;
  const Int32Views& pages;
  const std::vector<i64>&owner, &query_end;
  i64 ps;

  i64 num_nodes() const { return static_cast<i64>(parent.size()); }
  i64 num_queries() const { return static_cast<i64>(owner.size()); }
  i64 first_page(i64 m) const { return start[m] / ps; }

  // Everything the walk and the table writes rely on but the forest shape, which the walk checks (bad
  // input raises, it never reads out of bounds). Page ids are checked where they are read.
  void check() const {
    const i64 m_count = num_nodes(), n = num_queries();
    for (i64 m = 0; m < m_count; ++m) {
      if (parent[m] < -1 || parent[m] >= m_count || parent[m] == m)
        throw std::invalid_argument("parent: expected -1 or another node's index < " + str(m_count) + " for node " +
                                    str(m) + ", got " + str(parent[m]));
      const i64 begin = parent[m] < 0 ? 0 : end[parent[m]];
      if (start[m] != begin)
        throw std::invalid_argument("start: expected " + str(begin) + " for node " + str(m) +
                                    " (a root starts at 0, a child where its parent ends), got " + str(start[m]));
      if (end[m] < start[m])
        throw std::invalid_argument("end: expected >= start=" + str(start[m]) + " for node " + str(m) + ", got " +
                                    str(end[m]));
      const i64 want = end[m] > start[m] ? ceil_div(end[m], ps) - first_page(m) : 0, count = pages.size(m);
      if (count != want)
        throw std::invalid_argument("pages: expected " + str(want) + " page ids for node " + str(m) +
                                    " (path positions [" + str(start[m]) + ", " + str(end[m]) + ") at page_size " +
                                    str(ps) + "), got " + str(count));
    }
    for (i64 q = 0; q < n; ++q) {
      const i64 m = owner[q], e = query_end[q];
      if (m < -1 || m >= m_count)
        throw std::invalid_argument("query_owner: expected -1 or a node index < " + str(m_count) + " for query " +
                                    str(q) + ", got " + str(m));
      if (m < 0 && e != 0)
        throw std::invalid_argument("query_end: expected 0 (no owner) for query " + str(q) + ", got " + str(e));
      if (m >= 0 && (e <= start[m] || e > end[m]))
        throw std::invalid_argument("query_end: expected start < query_end <= end of node " + str(m) + " (" +
                                    str(start[m]) + ", " + str(end[m]) + "] for query " + str(q) + ", got " +
                                    str(e));
    }
  }
};

// The walk of TreeKVCache.plan (numpy twin: _plan_tree_numpy in plan.py, line for line). Depth-first
// order of the queries: a node's subtree is contiguous, its descendants' queries first, then its own by
// decreasing end. Each node yields trie segments (page-depth range, sorted-query range); segments with the
// same query range chain along one path and merge into one edge (first-seen order is the edge order).
struct TreeWalk {
  const Tree& t;
  std::vector<i64> order, kid_ptr, kids, own_ptr, own;
  std::vector<i64> lo, hi, d0, d1, tail;
  // Edge of each (lo, hi): open addressing (linear probing) over a power-of-two table of edge indices, -1
  // empty, at most half full; no allocation per edge, which std::unordered_map's nodes cost.
  std::vector<i64> slots;

  explicit TreeWalk(const Tree& tree) : t(tree) {
    const i64 m_count = t.num_nodes(), n = t.num_queries();
    // Children in index order and each node's own queries in query order, as CSR lists.
    kid_ptr.assign(m_count + 1, 0);
    own_ptr.assign(m_count + 1, 0);
    for (i64 m = 0; m < m_count; ++m)
      if (t.parent[m] >= 0) kid_ptr[t.parent[m] + 1]++;
    for (i64 q = 0; q < n; ++q)
      if (t.owner[q] >= 0) own_ptr[t.owner[q] + 1]++;
    for (i64 m = 0; m < m_count; ++m) {
      kid_ptr[m + 1] += kid_ptr[m];
      own_ptr[m + 1] += own_ptr[m];
    }
    kids.resize(kid_ptr[m_count]);
    own.resize(own_ptr[m_count]);
    std::vector<i64> kid_fill(kid_ptr.begin(), kid_ptr.end() - 1), own_fill(own_ptr.begin(), own_ptr.end() - 1);
    for (i64 m = 0; m < m_count; ++m)
      if (t.parent[m] >= 0) kids[kid_fill[t.parent[m]]++] = m;
    for (i64 q = 0; q < n; ++q)
      if (t.owner[q] >= 0) own[own_fill[t.owner[q]]++] = q;
    for (i64 m = 0; m < m_count; ++m)
      if (own_ptr[m + 1] - own_ptr[m] > 1)  // (most nodes own one query or none)
        std::sort(own.begin() + own_ptr[m], own.begin() + own_ptr[m + 1], [&](i64 a, i64 b) {
          return t.query_end[a] != t.query_end[b] ? t.query_end[a] > t.query_end[b] : a < b;
        });
    order.reserve(n);
    // Usually one segment per node or query; room for that up front saves most regrowth.
    for (std::vector<i64>* v : {&lo, &hi, &d0, &d1, &tail}) v->reserve(m_count + n);
    slots.assign(next_pow2(2 * (m_count + n) + 2), -1);

    // Post-order over the forest, roots and children in index order: (node, lo) with lo < 0 on the way down.
    std::vector<std::pair<i64, i64>> stack;
    for (i64 m = m_count - 1; m >= 0; --m)
      if (t.parent[m] < 0) stack.emplace_back(m, -1);
    i64 entered = 0;
    while (!stack.empty()) {
      auto [m, first] = stack.back();
      stack.pop_back();
      if (first < 0) {
        ++entered;
        if (kid_ptr[m + 1] > kid_ptr[m]) {
          stack.emplace_back(m, static_cast<i64>(order.size()));
          for (i64 k = kid_ptr[m + 1] - 1; k >= kid_ptr[m]; --k) stack.emplace_back(kids[k], -1);
          continue;
        }
        first = static_cast<i64>(order.size());
      }
      visit(m, first);
    }
    // Nodes on a parent cycle lead to no root: the walk never enters them (and the table writes, which
    // follow parent links, must not run).
    if (entered != m_count)
      throw std::invalid_argument("parent: expected a forest (every node leads to a root), got a cycle");
    for (i64 q = 0; q < n; ++q)
      if (t.owner[q] < 0) order.push_back(q);  // empty queries: no pages, no edges
  }

  // The slot holding edge (l, h), or the empty slot where it goes.
  i64& slot(i64 l, i64 h) {
    const size_t mask = slots.size() - 1;
    size_t at = static_cast<size_t>(l * 0x9E3779B97F4A7C15ULL ^ h * 0xC2B2AE3D27D4EB4FULL) & mask;
    while (slots[at] >= 0 && (lo[slots[at]] != l || hi[slots[at]] != h)) at = (at + 1) & mask;
    return slots[at];
  }

  void add_segment(i64 l, i64 h, i64 a, i64 b, i64 tl) {
    i64& k = slot(l, h);
    if (k >= 0) {
      d0[k] = std::min(d0[k], a);
      if (b > d1[k]) {
        d1[k] = b;
        tail[k] = tl;
      }
      return;
    }
    k = static_cast<i64>(lo.size());
    lo.push_back(l);
    hi.push_back(h);
    d0.push_back(a);
    d1.push_back(b);
    tail.push_back(tl);
    if (2 * lo.size() > slots.size()) {  // keep it at most half full: twice the slots, edges placed again
      slots.assign(2 * slots.size(), -1);
      for (i64 e = 0; e < static_cast<i64>(lo.size()); ++e) slot(lo[e], hi[e]) = e;
    }
  }

  // Node m after its subtree: its descendants' queries are order[first : now).
  void visit(i64 m, i64 first) {
    const i64 ps = t.ps, desc_end = static_cast<i64>(order.size());
    const i64 a = t.first_page(m), b = t.end[m] / ps;
    const i64* mine = own.data() + own_ptr[m];
    const i64 count = own_ptr[m + 1] - own_ptr[m];
    if (desc_end == first && count == 1) {  // a leaf of one query (the usual case)
      const i64 e = t.query_end[mine[0]], f = e / ps, rest = e % ps;
      order.push_back(mine[0]);
      if (rest)
        add_segment(first, first + 1, a, f + 1, ps - rest);
      else if (a < f)
        add_segment(first, first + 1, a, f, 0);
      return;
    }
    if (count == 0) {  // a shared ancestor: all its full pages go to every descendant
      if (a < b) add_segment(first, desc_end, a, b, 0);
      return;
    }
    order.insert(order.end(), mine, mine + count);
    // Full pages [a, b): every descendant reads them all, an own query of end e reads [a, e / ps).
    std::vector<i64> fulls_asc(count);
    for (i64 i = 0; i < count; ++i) fulls_asc[i] = t.query_end[mine[count - 1 - i]] / ps;
    if (fulls_asc[0] >= b) {  // every own query reads them all (the usual leaf)
      if (a < b) add_segment(first, desc_end + count, a, b, 0);
    } else {
      std::vector<i64> cuts{a, b};
      for (i64 f : fulls_asc)
        if (a < f && f < b) cuts.push_back(f);
      std::sort(cuts.begin(), cuts.end());
      cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
      for (size_t c = 0; c + 1 < cuts.size(); ++c) {
        const i64 reading = fulls_asc.end() - std::upper_bound(fulls_asc.begin(), fulls_asc.end(), cuts[c]);
        if (desc_end + reading > first) add_segment(first, desc_end + reading, cuts[c], cuts[c + 1], 0);
      }
    }
    // Partial last pages of own queries: one edge per run of equal ends.
    for (i64 i = 0, j; i < count; i = j) {
      const i64 e = t.query_end[mine[i]];
      for (j = i + 1; j < count && t.query_end[mine[j]] == e; ++j) {
      }
      if (e % ps) add_segment(desc_end + i, desc_end + j, e / ps, e / ps + 1, ps - e % ps);
    }
  }
};

// TreeKVCache.plan's planner: (packed, piece sizes, stats, max_item_tokens, max_page_id, kv_indptr,
// kv_indices, kv_last_page_len) with the same plan arrays and stats as _plan_tree_numpy in plan.py.
py::tuple plan_tree(const std::vector<i64>& parent, const std::vector<i64>& start, const std::vector<i64>& end,
                    const py::list& page_lists, const std::vector<i64>& owner, const std::vector<i64>& query_end,
                    i64 ps, const Sizing& s) {
  const i64 m_count = static_cast<i64>(parent.size());
  if (static_cast<i64>(start.size()) != m_count || static_cast<i64>(end.size()) != m_count ||
      static_cast<i64>(page_lists.size()) != m_count)
    throw std::invalid_argument("tree: expected parent, start, end and pages of one length (one entry per node), got " +
                                str(m_count) + ", " + str(start.size()) + ", " + str(end.size()) + ", " +
                                str(page_lists.size()));
  if (query_end.size() != owner.size())
    throw std::invalid_argument("query_end: expected one entry per query (" + str(owner.size()) + "), got " +
                                str(query_end.size()));
  if (ps < 1) throw std::invalid_argument("page_size: expected a positive int, got " + str(ps));
  const Int32Views pages(page_lists);
  const Tree t{parent, start, end, pages, owner, query_end, ps};
  t.check();
  const i64 n = t.num_queries();
  const TreeWalk walk(t);

  // The table: query q reads its owner's root->owner page list, cut at ceil(query_end / ps) pages.
  IntArray indptr(n + 1), last_len(n);
  int32_t* ptr = indptr.mutable_data();
  int32_t* last = last_len.mutable_data();
  i64 nnz = 0, naive_tokens = 0;
  ptr[0] = 0;
  for (i64 q = 0; q < n; ++q) {
    const i64 e = query_end[q], num_pages = ceil_div(e, ps);
    nnz += num_pages;
    naive_tokens += e;
    if (nnz > INT32_MAX) throw std::invalid_argument("query_end: the table would exceed 2^31 - 1 page slots");
    ptr[q + 1] = static_cast<int32_t>(nnz);
    last[q] = static_cast<int32_t>(num_pages ? e - (num_pages - 1) * ps : 0);
  }
  IntArray indices(nnz);
  int32_t* rows = indices.mutable_data();
  for (i64 q = 0; q < n; ++q) {
    i64 limit = ptr[q + 1] - ptr[q];  // pages of the row still to write, from index 0
    for (i64 m = owner[q]; m >= 0 && limit > 0; m = parent[m]) {
      if (pages.size(m) == 0) continue;  // a node without tokens: its path is its parent's
      const i64 a = t.first_page(m);
      if (limit > a) std::memcpy(rows + ptr[q] + a, pages.data(m), (limit - a) * sizeof(int32_t));
      limit = std::min(limit, a);
    }
  }

  // Token stats from the nodes, not the table (each page once, not once per query that reads it). A node's
  // pages are read as a prefix of its list: in full up to `kids ? end : reach` (every marked child leads to
  // queries, and those read all of its full pages), then at most one page in part, up to its own queries'
  // largest end (`reach`). A page is another node's too only where a child continues its parent's last
  // page in place (plan_from_tree's contract): a node's first page when it starts mid-page, its last when
  // it ends mid-page. Those few reads count once per page, at their largest; the others count directly.
  std::vector<i64> own_reach(parent.size(), 0);
  std::vector<uint8_t> has_kids(parent.size(), 0);
  for (i64 q = 0; q < n; ++q)
    if (owner[q] >= 0) own_reach[owner[q]] = std::max(own_reach[owner[q]], query_end[q]);
  for (i64 m = 0; m < m_count; ++m)
    if (parent[m] >= 0) has_kids[parent[m]] = 1;
  i64 unique_tokens = 0, max_page = -1;
  std::vector<std::pair<i64, i64>> boundary;  // (page id, tokens read) of first / last pages
  for (i64 m = 0; m < m_count; ++m) {
    const int32_t* ids = pages.data(m);
    const i64 a = t.first_page(m), count = pages.size(m), reach = own_reach[m];
    const i64 full_run = std::max<i64>(0, (has_kids[m] ? end[m] : reach) / ps - a);
    const i64 part = full_run < count ? std::max<i64>(0, reach - (a + full_run) * ps) : 0;
    const i64 read = full_run + (part > 0);
    // The largest read id is the plan's max_page_id; every id must be >= 0, i.e. the OR of all has no sign
    // bit (one vector op per 4 ids where a min reduction takes several).
    int32_t bits = 0;
    const int32_t high = max_id(ids, read, count, bits);
    if (bits < 0)
      throw std::invalid_argument("pages: expected page ids >= 0, got " + str(*std::min_element(ids, ids + count)) +
                                  " in node " + str(m));
    max_page = std::max<i64>(max_page, high);
    unique_tokens += full_run * ps + part;
    auto tokens_at = [&](i64 j) { return j < full_run ? ps : part; };
    const bool first_shared = start[m] % ps && read > 0;
    const bool last_shared = end[m] % ps && read == count && !(count == 1 && first_shared);
    for (i64 j : {first_shared ? i64{0} : i64{-1}, last_shared ? count - 1 : i64{-1}}) {
      if (j < 0) continue;
      unique_tokens -= tokens_at(j);
      boundary.emplace_back(ids[j], tokens_at(j));
    }
  }
  std::sort(boundary.begin(), boundary.end());
  for (size_t k = 0; k < boundary.size(); ++k)
    if (k + 1 == boundary.size() || boundary[k + 1].first != boundary[k].first) unique_tokens += boundary[k].second;

  Edges e{walk.lo, walk.hi, walk.d0, {}, {}, walk.tail};
  for (size_t k = 0; k < walk.lo.size(); ++k) {
    e.pages.push_back(walk.d1[k] - walk.d0[k]);
    e.first_page.push_back(ptr[walk.order[walk.lo[k]]] + walk.d0[k]);
  }
  py::tuple items = build_items(walk.order, e, ps, s);
  py::dict stats = items[2];
  stats["unique_tokens"] = unique_tokens;
  stats["naive_tokens"] = naive_tokens;
  return py::make_tuple(items[0], items[1], stats, items[3], max_page, indptr, indices, last_len);
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
  m.doc() = "treeattn host planner (C++ twin of the numpy planner in treeattn/plan.py)";
  m.def(
      "plan_table",
      [](IntArray indptr, IntArray indices, IntArray last_len, i64 page_size, i64 num_pages, bool share_prefixes,
         i64 group, i64 kv_heads, i64 num_sms, i64 target_rows, i64 tokens_per_partial_row, i64 min_chunk_tokens,
         i64 programs_per_sm) {
        Sizing s{group, kv_heads, num_sms, target_rows, tokens_per_partial_row, min_chunk_tokens, programs_per_sm};
        return plan_table(indptr, indices, last_len, page_size, num_pages, share_prefixes, s);
      },
      "Plan a CSR page table: returns (packed int32 buffer, piece sizes, stats, max_item_tokens, max_page_id).");
  m.def(
      "plan_tree",
      [](py::object parent, py::object start, py::object end, py::list pages, py::object query_owner,
         py::object query_end, i64 page_size, i64 group, i64 kv_heads, i64 num_sms, i64 target_rows,
         i64 tokens_per_partial_row, i64 min_chunk_tokens, i64 programs_per_sm) {
        Sizing s{group, kv_heads, num_sms, target_rows, tokens_per_partial_row, min_chunk_tokens, programs_per_sm};
        return plan_tree(int64s(parent, "parent: expected a sequence of ints"),
                         int64s(start, "start: expected a sequence of ints"),
                         int64s(end, "end: expected a sequence of ints"), pages,
                         int64s(query_owner, "query_owner: expected a sequence of ints"),
                         int64s(query_end, "query_end: expected a sequence of ints"), page_size, s);
      },
      "Plan a known tree (TreeKVCache.plan): returns (packed int32 buffer, piece sizes, stats, max_item_tokens, "
      "max_page_id, kv_indptr, kv_indices, kv_last_page_len).");
}
