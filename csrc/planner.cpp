// Host planner of treeattn (pybind11 module treeattn._planner): the C++ twin of the numpy planner in
// python/treeattn/plan.py. Both produce identical plans (tests/test_planner_cpp.py checks it); this one
// meets the DESIGN §4 host budget (<= 200 us for 256 queries x 8k tokens at page size 16).
//
// Two entry points, one back end:
// - plan_table (treeattn.plan): validate the CSR table; key every page slot by (page id, tokens used); sort
//   queries lexicographically by key lists (multikey radix sort that skips common runs with memcmp); LCPs of
//   neighbours; LCP-interval stack walk -> compressed-trie edges.
// - plan_tree (TreeKVCache.plan): the cache knows its tree, so the edges come from a walk of the queried
//   subtree (O(nodes + queries), no sorting or page comparisons), and the table is written from the nodes'
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
#include <unordered_map>
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
      "plan_edges",
      [](py::array_t<i64, py::array::c_style | py::array::forcecast> order, std::vector<i64> lo, std::vector<i64> hi,
         std::vector<i64> depth, std::vector<i64> pages, std::vector<i64> first_page, std::vector<i64> tail,
         i64 page_size, i64 group, i64 kv_heads, i64 num_sms, i64 target_rows, i64 tokens_per_partial_row,
         i64 min_chunk_tokens, i64 programs_per_sm) {
        Sizing s{group, kv_heads, num_sms, target_rows, tokens_per_partial_row, min_chunk_tokens, programs_per_sm};
        std::vector<i64> ord(order.data(), order.data() + order.size());
        return build_items(ord, Edges{lo, hi, depth, pages, first_page, tail}, page_size, s);
      },
      "Edges -> (packed int32 buffer, piece sizes, stats without the table counts, max_item_tokens).");
}
