// treeattn's host planner, the core (declared, with the packed layout and the sizing policy, in planner.h).
// Plain C++: the Python binding (argument conversion, the result as a dict) is planner_bindings.cpp.

#include "planner.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace treeattn::planner {

namespace {

std::string str(i64 v) { return std::to_string(v); }

i64 checked(const char* name, i64 value, i64 low, i64 high) {
  if (value < low || value > high)
    throw std::invalid_argument(std::string(name) + ": expected an int in [" + str(low) + ", " + str(high) +
                                "], got " + str(value));
  return value;
}

}  // namespace

Options make_options(i64 page_size, std::optional<i64> num_pages, bool share_prefixes,
                     std::optional<i64> num_qo_heads, std::optional<i64> num_kv_heads, i64 num_sms,
                     std::optional<Capacity> capacity, std::optional<i64> max_queries_per_item) {
  Options o;
  o.page_size = checked("page_size", page_size, 1, INT32_MAX);
  // Page ids are int32: a pool of 2^31 pages holds every one of them.
  if (num_pages) o.num_pages = checked("num_pages", *num_pages, 0, i64{1} << 31);
  o.share_prefixes = share_prefixes;
  if (num_qo_heads) checked("num_qo_heads", *num_qo_heads, 1, INT32_MAX);
  if (num_kv_heads) o.kv_heads = checked("num_kv_heads", *num_kv_heads, 1, INT32_MAX);
  if (num_qo_heads && num_kv_heads) o.group = std::max<i64>(1, *num_qo_heads / *num_kv_heads);
  o.num_sms = checked("num_sms", num_sms, 1, INT32_MAX);
  if (max_queries_per_item) o.max_queries_per_item = checked("max_queries_per_item", *max_queries_per_item, 1, INT32_MAX);
  if (capacity) {
    Capacity& c = *capacity;
    const std::pair<const char*, i64*> fields[] = {{"capacity.items", &c.items}, {"capacity.rows", &c.rows},
                                                   {"capacity.partial_rows", &c.partial_rows},
                                                   {"capacity.merge_queries", &c.merge_queries},
                                                   {"capacity.nnz", &c.nnz}};
    for (auto [name, value] : fields) checked(name, *value, 1, INT32_MAX - 1);
    o.capacity = c;
  }
  return o;
}

namespace {

struct Table {
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_len;
  i64 num_queries;
  i64 nnz;
  i64 page_size;
};

// Validates the table's offsets and last-page lengths (page ids: check_page_ids, once the shared runs are known).
void check_offsets(const Table& t) {
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
  for (i64 i = 0; i < t.num_queries; ++i) {
    if (t.indptr[i + 1] > t.indptr[i] && (t.last_len[i] < 1 || t.last_len[i] > t.page_size))
      throw std::invalid_argument("kv_last_page_len: expected 1..page_size=" + str(t.page_size) + " for query " +
                                  str(i) + " (it has pages), got " + str(t.last_len[i]));
  }
}

// Smallest and largest of ids[0:count) into low / high. Baseline x86-64 (SSE2) has no packed int32 min/max
// and takes four ops for one, so x86-64 glibc builds also carry an SSE4.1 (pminsd/pmaxsd) clone, which the
// loader picks where the CPU has it (GCC/Clang function multiversioning; same results, ~3x faster).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
__attribute__((target_clones("sse4.1", "default")))
#endif
void min_max(const int32_t* ids, i64 count, int32_t& low, int32_t& high) {
  int32_t lo = low, hi = high;
  for (i64 j = 0; j < count; ++j) {
    lo = std::min(lo, ids[j]);
    hi = std::max(hi, ids[j]);
  }
  low = lo;
  high = hi;
}

void check_page_ids(int32_t low, int32_t high, i64 num_pages) {
  if (low < 0) throw std::invalid_argument("kv_indices: expected page ids >= 0, got " + str(low));
  if (num_pages >= 0 && high >= num_pages)
    throw std::invalid_argument("kv_indices: expected page ids < num_pages=" + str(num_pages) + ", got " + str(high));
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

// Sorts the queries lexicographically by key lists (stable). A work list of (lo, hi, depth) ranges whose
// members agree on depths [0, depth), not recursion: deep chains of nested groups cannot overflow the stack.
// agreed[i] (n + 1 entries, zeros on entry): depths that sorted queries i - 1 and i are known to share, so that
// their LCP is only compared from there (the shared prompt of a step is compared once, not twice).
std::vector<i64> sorted_queries(const Keys& keys, i64 n, std::vector<i64>& agreed) {
  std::vector<i64> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::vector<std::array<i64, 3>> todo{{0, n, 0}};
  std::vector<std::pair<i64, i64>> keyed;  // (key at depth, position in order) of the range being sorted
  std::vector<i64> moved;
  while (!todo.empty()) {
    auto [lo, hi, depth] = todo.back();
    todo.pop_back();
    while (hi - lo > 1) {
      // Skip the run that every member shares from `depth` on (one memcmp per member).
      i64 first = order[lo];
      i64 shared = keys.length(first) - std::min(depth, keys.length(first));
      for (i64 i = lo + 1; i < hi && shared > 0; ++i) {
        i64 q = order[i];
        shared = keys.common(first, q, depth, std::min(shared, keys.length(q) - std::min(depth, keys.length(q))));
      }
      depth += shared;
      std::fill(agreed.begin() + lo + 1, agreed.begin() + hi, depth);  // (ranges only nest deeper)
      // A stable sort by the key at `depth`: (key, position) pairs, each key computed once instead of twice per
      // comparison (the sort of a 256-branch step's leaves was a tenth of its plan).
      keyed.clear();
      for (i64 i = lo; i < hi; ++i) keyed.push_back({keys.at(order[i], depth), i});
      std::sort(keyed.begin(), keyed.end());
      moved.assign(order.begin() + lo, order.begin() + hi);
      for (i64 i = lo; i < hi; ++i) order[i] = moved[keyed[i - lo].second - lo];
      // Every group of equal keys but the last goes on the work list; the loop goes on with the last.
      i64 group_lo = lo;
      for (i64 i = lo + 1; i < hi; ++i) {
        if (keyed[i - lo].first != keyed[group_lo - lo].first) {
          if (keyed[group_lo - lo].first >= 0) todo.push_back({group_lo, i, depth + 1});
          group_lo = i;
        }
      }
      if (keyed[group_lo - lo].first < 0) break;  // lists that all ended: identical, already stable
      lo = group_lo;
      depth += 1;
    }
  }
  return order;
}

i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
i64 next_pow2(i64 x) {
  i64 p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Page ids -> slots of a table of at most ~4 nnz + 128 entries: the identity when ids are dense, else an
// open-addressing hash. Per-page state then costs O(nnz) memory and time however large the ids are.
class PageSlots {
 public:
  PageSlots(i64 max_page, i64 nnz) {
    dense_ = max_page < 2 * nnz + 64;
    if (dense_) {
      size_ = max_page + 1;
    } else {
      keys_.assign(next_pow2(2 * nnz + 2), -1);
      size_ = static_cast<i64>(keys_.size());
    }
  }
  i64 size() const { return size_; }
  // Dense: a page id is its own slot.
  bool dense() const { return dense_; }
  i64 operator()(int32_t page) {
    if (dense_) return page;
    const size_t mask = keys_.size() - 1;
    size_t at = (static_cast<uint64_t>(page) * 0x9E3779B97F4A7C15ULL >> 20) & mask;
    while (keys_[at] >= 0 && keys_[at] != page) at = (at + 1) & mask;
    keys_[at] = page;
    return static_cast<i64>(at);
  }

 private:
  bool dense_;
  i64 size_;
  std::vector<int32_t> keys_;
};

// True when ids[0:count) are consecutive (ids[j] == ids[0] + j): blocks of 16 steps OR-reduced, the compiler's
// vector code, stopping at the first block with a gap. (uint32: no overflow past INT32_MAX; ids are >= 0, so a
// wrapped id never continues a run.)
bool consecutive(const int32_t* ids, i64 count) {
  i64 j = 1;
  for (; j + 16 <= count; j += 16) {
    uint32_t steps = 0;
    for (i64 k = j; k < j + 16; ++k) steps |= (static_cast<uint32_t>(ids[k]) - static_cast<uint32_t>(ids[k - 1])) ^ 1u;
    if (steps) return false;
  }
  for (; j < count; ++j)
    if (static_cast<uint32_t>(ids[j]) != static_cast<uint32_t>(ids[j - 1]) + 1) return false;
  return true;
}

// Sets bit id of `bits` for every id in [begin, end) (ids >= 0, in range). A list of consecutive ids (what a
// fresh allocator hands out) is set a word at a time: one bit per page would chain every store through the
// same word. Other lists (shuffled pools) one bit per id: random words, no chain, and the bitset stays in L1.
void mark(uint64_t* bits, const int32_t* begin, const int32_t* end) {
  if (end - begin > 1 && consecutive(begin, end - begin)) {
    for (i64 lo = *begin, hi = lo + (end - begin); lo < hi;) {
      const i64 bit = lo & 63, count = std::min<i64>(64 - bit, hi - lo);
      bits[lo >> 6] |= (count == 64 ? ~uint64_t{0} : ((uint64_t{1} << count) - 1)) << bit;
      lo += count;
    }
    return;
  }
  for (const int32_t* p = begin; p < end; ++p) bits[*p >> 6] |= uint64_t{1} << (*p & 63);
}

// Set bits in words[0:count). x86-64 glibc builds carry a POPCNT clone (baseline x86-64 has no popcount
// instruction and calls a library routine per word).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
__attribute__((target_clones("popcnt", "default")))
#endif
i64 count_bits(const uint64_t* words, i64 count) {
  i64 total = 0;
  for (i64 k = 0; k < count; ++k) total += __builtin_popcountll(words[k]);
  return total;
}

// Distinct (page, slot) tokens: each page counts its largest used prefix once. A full use covers any partial
// one, and only last slots are partial: a set of fully used pages plus the few partially used last pages.
// Only the pages of each sorted query past its LCP with its predecessor are read: the others are the
// predecessor's (same ids, same tokens), already counted.
i64 unique_tokens_of(const Table& t, const Keys& keys, const std::vector<i64>& order, const std::vector<i64>& lcp,
                     i64 max_page) {
  const i64 ps = t.page_size;
  PageSlots slot(max_page, t.nnz);
  // One bit per page slot (16 KiB for 128k pages stays in L1), in a buffer the thread keeps.
  thread_local std::vector<uint64_t> full;
  full.assign((slot.size() + 63) / 64, 0);
  auto is_full = [&](i64 k) { return (full[k >> 6] >> (k & 63)) & 1; };
  std::vector<std::pair<int32_t, i64>> partial_pages;
  for (size_t i = 0; i < order.size(); ++i) {
    const i64 q = order[i], len = keys.length(q);
    const int32_t* pages = t.indices + t.indptr[q];
    const i64 full_len = len > 0 && t.last_len[q] != ps ? len - 1 : len;
    if (slot.dense()) {
      mark(full.data(), pages + std::min(lcp[i], full_len), pages + full_len);
    } else {
      for (i64 d = lcp[i]; d < full_len; ++d) {
        const i64 k = slot(pages[d]);
        full[k >> 6] |= uint64_t{1} << (k & 63);
      }
    }
    if (full_len < len && lcp[i] < len) partial_pages.emplace_back(pages[len - 1], t.last_len[q]);
  }
  i64 unique_tokens = ps * count_bits(full.data(), static_cast<i64>(full.size()));
  std::sort(partial_pages.begin(), partial_pages.end());
  for (size_t k = 0; k < partial_pages.size(); ++k) {
    const bool last_of_page = k + 1 == partial_pages.size() || partial_pages[k + 1].first != partial_pages[k].first;
    if (last_of_page && !is_full(slot(partial_pages[k].first))) unique_tokens += partial_pages[k].second;
  }
  return unique_tokens;
}

// Sets bit id of `bits` for every id in [begin, end), unless an id is outside [0, limit): then false, with
// some bits set (the caller starts over). One pass does what a min/max check of the ids and then mark() would
// do in two: the bound is one compare per id, and a run of consecutive ids is checked at its ends. x86-64
// glibc builds carry a BMI2 clone (shifts by a register without the flags dependency: ~15% on shuffled ids).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
__attribute__((target_clones("bmi2", "default")))
#endif
bool mark_below(uint64_t* bits, const int32_t* begin, const int32_t* end, uint32_t limit) {
  if (end - begin > 1 && consecutive(begin, end - begin)) {
    // (consecutive: ids are begin[0] + j as uint32, so the run is in range when its ends are)
    if (static_cast<uint32_t>(begin[0]) >= limit || static_cast<uint32_t>(end[-1]) >= limit ||
        static_cast<uint32_t>(end[-1]) < static_cast<uint32_t>(begin[0]))
      return false;
    mark(bits, begin, end);
    return true;
  }
  for (const int32_t* p = begin; p < end; ++p) {
    const uint32_t id = static_cast<uint32_t>(*p);
    if (id >= limit) return false;
    bits[id >> 6] |= uint64_t{1} << (id & 63);
  }
  return true;
}

// unique_tokens_of and the page-id check in one pass, for the usual table: every id read is in [0, limit) with
// limit = min(num_pages, the dense bound of PageSlots), so a bitset of `limit` bits indexed by page id serves
// and the largest id is its highest set bit (or a partial last page's). Returns false, having changed nothing
// the caller keeps, when some id is outside that range (negative, past num_pages, or sparse ids): the caller
// then checks the ids and counts with unique_tokens_of, which gives their errors and their count.
bool dense_unique_tokens(const Table& t, const Keys& keys, const std::vector<i64>& order, const std::vector<i64>& lcp,
                         i64 num_pages, i64& max_page, i64& unique_tokens) {
  const i64 ps = t.page_size;
  i64 bound = 2 * t.nnz + 64;  // (PageSlots' dense case: max_page < 2 nnz + 64)
  if (num_pages >= 0) bound = std::min(bound, num_pages);
  const uint32_t limit = static_cast<uint32_t>(std::min<i64>(bound, INT32_MAX));
  thread_local std::vector<uint64_t> full;  // (unique_tokens_of's bitset is another: no aliasing between them)
  full.assign((static_cast<i64>(limit) + 63) / 64, 0);
  std::vector<std::pair<int32_t, i64>> partial_pages;
  for (size_t i = 0; i < order.size(); ++i) {
    const i64 q = order[i], len = keys.length(q);
    const int32_t* pages = t.indices + t.indptr[q];
    const i64 full_len = len > 0 && t.last_len[q] != ps ? len - 1 : len;
    if (!mark_below(full.data(), pages + std::min(lcp[i], full_len), pages + full_len, limit)) return false;
    if (full_len < len && lcp[i] < len) {
      if (static_cast<uint32_t>(pages[len - 1]) >= limit) return false;
      partial_pages.emplace_back(pages[len - 1], t.last_len[q]);
    }
  }
  i64 high = -1;
  for (i64 w = static_cast<i64>(full.size()) - 1; w >= 0; --w)
    if (full[w]) {
      high = w * 64 + 63 - __builtin_clzll(full[w]);
      break;
    }
  i64 tokens = ps * count_bits(full.data(), static_cast<i64>(full.size()));
  std::sort(partial_pages.begin(), partial_pages.end());
  for (size_t k = 0; k < partial_pages.size(); ++k) {
    const int32_t page = partial_pages[k].first;
    high = std::max<i64>(high, page);
    const bool last_of_page = k + 1 == partial_pages.size() || partial_pages[k + 1].first != page;
    if (last_of_page && !((full[page >> 6] >> (page & 63)) & 1)) tokens += partial_pages[k].second;
  }
  max_page = high;
  unique_tokens = tokens;
  return true;
}

// Compressed-trie edges: edge k is pages [depth, depth + pages) of the sorted queries lo..hi-1 (at least
// one), stored at kv_indices[first_page : first_page + pages], with `tail` unused slots in its last page.
struct Edges {
  std::vector<i64> lo, hi, depth, pages, first_page, tail;
};

// The plan's arrays but the table, and what the kernels and the stats need to know about them. int32, as in
// the plan: every value is below nnz, the number of queries or the number of rows, and a query's rows read
// disjoint page runs of its list, so rows <= nnz <= 2^31 - 1 (build_items checks the totals).
struct Items {
  std::vector<int32_t> item_page_ptr, item_num_tokens, item_row_ptr, row_query, row_dest, merge_query, merge_ptr;
  i64 planned_tokens = 0, max_queries = 0, max_item_tokens = 0, num_edges = 0, partial_rows = 0, direct = 0;
  i64 block_queries = 1;  // the sizing's query block: no item holds more queries
};

// How the edges are cut: each edge's query blocks and its chunks (and pages per chunk), from the edges' query
// counts, pages and last-page tails. The chunk length balances the step's work over the machine, so it
// depends on every edge's tokens (patch_growth checks that a step's growth leaves it as it was).
struct Chunking {
  i64 block_queries = 1;
  std::vector<i64> blocks, chunks, chunk_pages;
  i64 num_items = 0, num_rows = 0;
};

Chunking chunking(const std::vector<i64>& lo, const std::vector<i64>& hi, const std::vector<i64>& pages,
                  const std::vector<i64>& tail, const Options& o) {
  const i64 ps = o.page_size, num_edges = static_cast<i64>(lo.size());
  Chunking c;
  c.block_queries = std::max<i64>(1, kSizing.target_rows_per_item / next_pow2(o.group));
  if (o.max_queries_per_item > 0) c.block_queries = std::min(c.block_queries, o.max_queries_per_item);
  c.blocks.resize(num_edges);
  c.chunks.resize(num_edges);
  c.chunk_pages.resize(num_edges);
  i64 total_work = 0;
  for (i64 k = 0; k < num_edges; ++k) {
    c.blocks[k] = ceil_div(hi[k] - lo[k], c.block_queries);
    total_work += (pages[k] * ps - tail[k]) * c.blocks[k];
  }
  const i64 programs = std::max<i64>(1, kSizing.programs_per_sm * o.num_sms / o.kv_heads);
  const i64 balanced = ceil_div(total_work, programs);
  // An item's token count is an int32 of the plan: at most that many pages per chunk, whatever the policy.
  const i64 max_chunk_pages = std::max<i64>(1, INT32_MAX / ps);
  for (i64 k = 0; k < num_edges; ++k) {
    const i64 queries = hi[k] - lo[k];
    const i64 rows_per_block = ceil_div(queries, c.blocks[k]) * o.group;
    const i64 chunk_tokens =
        std::max({rows_per_block * kSizing.tokens_per_partial_row, balanced, kSizing.min_chunk_tokens});
    const i64 chunk_pages = std::min(max_chunk_pages, std::max<i64>(1, chunk_tokens / ps));
    c.chunks[k] = ceil_div(pages[k], chunk_pages);
    c.chunk_pages[k] = ceil_div(pages[k], c.chunks[k]);
    c.num_items += c.blocks[k] * c.chunks[k];
    c.num_rows += queries * c.chunks[k];
  }
  return c;
}

// Edges -> chunks x query blocks -> items, rows, partial rows (root->leaf per query), merge CSR. Sizes are
// known before the rows are made, so every array is written in place, once.
Items build_items(const std::vector<i64>& order, const Edges& e, const Chunking& cut, const Options& o) {
  const i64 ps = o.page_size;
  Items it;
  it.block_queries = cut.block_queries;
  const i64 n = static_cast<i64>(order.size()), num_edges = static_cast<i64>(e.lo.size());
  const std::vector<i64>&eb = cut.blocks, &echunks = cut.chunks, &echunk_pages = cut.chunk_pages;
  const i64 num_items = cut.num_items, num_rows = cut.num_rows;
  for (auto [name, count] : {std::pair<const char*, i64>{"items", num_items}, {"rows", num_rows}})
    if (count >= INT32_MAX)  // (the input bounds keep them below: a defence, not a limit)
      throw std::invalid_argument(std::string("plan: expected ") + name + " to fit int32, got " + str(count));

  it.item_page_ptr.resize(num_items);
  it.item_num_tokens.resize(num_items);
  it.item_row_ptr.resize(num_items + 1);
  it.row_query.resize(num_rows);
  std::vector<int32_t> row_depth(num_rows), rows_per_query(n, 0);
  i64 item = 0, row = 0;
  it.item_row_ptr[0] = 0;
  for (i64 k = 0; k < num_edges; ++k) {
    for (i64 b = 0; b < eb[k]; ++b) {
      // Balanced query blocks: block b holds sorted queries [lo + b*q/nb, lo + (b+1)*q/nb).
      const i64 queries = e.hi[k] - e.lo[k];
      const i64 block_lo = e.lo[k] + b * queries / eb[k], block_hi = e.lo[k] + (b + 1) * queries / eb[k];
      for (i64 c = 0; c < echunks[k]; ++c) {
        const i64 page_begin = c * echunk_pages[k];
        const i64 pages = std::min(echunk_pages[k], e.pages[k] - page_begin);
        const i64 tokens = pages * ps - (page_begin + pages == e.pages[k] ? e.tail[k] : 0);
        it.item_page_ptr[item] = static_cast<int32_t>(e.first_page[k] + page_begin);
        it.item_num_tokens[item] = static_cast<int32_t>(tokens);
        it.planned_tokens += tokens;
        it.max_item_tokens = std::max(it.max_item_tokens, tokens);
        const int32_t depth = static_cast<int32_t>(e.depth[k] + page_begin);
        for (i64 q = block_lo; q < block_hi; ++q, ++row) {
          const i64 query = order[q];
          it.row_query[row] = static_cast<int32_t>(query);
          row_depth[row] = depth;
          rows_per_query[query]++;
        }
        it.item_row_ptr[++item] = static_cast<int32_t>(row);
        it.max_queries = std::max(it.max_queries, block_hi - block_lo);
      }
    }
  }

  // Queries with one row write directly; the others' rows become partial rows, by (query, depth).
  // Bucketed by query (a counting sort, stable in row order), then each query's few rows by depth: linear
  // where a comparison sort of every partial row was the largest cost of a shared step.
  std::vector<int32_t> bucket_end(n, 0);
  i64 num_partial = 0, num_merges = 0;
  for (i64 q = 0; q < n; ++q)
    if (rows_per_query[q] > 1) {
      bucket_end[q] = static_cast<int32_t>(num_partial);
      num_partial += rows_per_query[q];
    }
  std::vector<int32_t> partial(num_partial);
  for (i64 r = 0; r < num_rows; ++r) {
    const int32_t q = it.row_query[r];
    if (rows_per_query[q] > 1) partial[bucket_end[q]++] = static_cast<int32_t>(r);
  }
  const auto by_depth = [&](int32_t a, int32_t b) { return row_depth[a] < row_depth[b]; };  // (depths differ)
  it.merge_query.reserve(n);
  it.merge_ptr.reserve(n + 1);
  it.merge_ptr.push_back(0);
  for (i64 q = 0; q < n; ++q) {
    if (rows_per_query[q] == 1) {
      ++it.direct;
      continue;
    }
    it.merge_query.push_back(static_cast<int32_t>(q));
    it.merge_ptr.push_back(it.merge_ptr.back() + rows_per_query[q]);
    ++num_merges;
    if (rows_per_query[q] == 0) continue;
    const auto last = partial.begin() + bucket_end[q], first = last - rows_per_query[q];
    if (!std::is_sorted(first, last, by_depth)) std::sort(first, last, by_depth);
  }
  it.row_dest.assign(num_rows, -1);
  for (i64 k = 0; k < num_partial; ++k) it.row_dest[partial[k]] = static_cast<int32_t>(k);
  it.num_edges = num_edges;
  it.partial_rows = num_partial;
  return it;
}

// One piece of the packed buffer: int32 values, or a writer that fills it in place (a tree plan's page ids:
// no intermediate copy of the largest piece).
struct PieceData {
  const int32_t* i32 = nullptr;
  i64 size = 0;
  const std::function<void(int32_t*)>* write = nullptr;
};

// The plan: table + items packed into one int32 buffer in kPieces order (padded to the capacity, if any),
// with its stats. The caller adds unique_tokens and naive_tokens.
Plan pack(const PieceData (&table)[3], const Items& it, i64 num_queries, i64 max_page, const Options& o) {
  const i64 nnz = table[1].size, num_items = static_cast<i64>(it.item_page_ptr.size());
  const i64 num_rows = static_cast<i64>(it.row_query.size()), num_merges = static_cast<i64>(it.merge_query.size());
  const PieceData pieces[kNumPieces] = {
      table[0], table[1], table[2],
      {it.item_page_ptr.data(), num_items}, {it.item_num_tokens.data(), num_items},
      {it.item_row_ptr.data(), num_items + 1}, {it.row_query.data(), num_rows},
      {it.row_dest.data(), num_rows}, {it.merge_query.data(), num_merges},
      {it.merge_ptr.data(), num_merges + 1}};
  i64 sizes[kNumPieces];
  for (size_t p = 0; p < kNumPieces; ++p) sizes[p] = pieces[p].size;
  if (o.capacity) {
    const Capacity& c = *o.capacity;
    const std::array<std::tuple<const char*, i64, i64>, 5> limits{{{"items", num_items, c.items},
                                                                   {"rows", num_rows, c.rows},
                                                                   {"partial_rows", it.partial_rows, c.partial_rows},
                                                                   {"merge_queries", num_merges, c.merge_queries},
                                                                   {"nnz", nnz, c.nnz}}};
    for (auto [name, used, limit] : limits)
      if (used > limit)
        throw std::invalid_argument(std::string("capacity: expected this step's ") + name + " <= capacity." + name +
                                    "=" + str(limit) + ", got " + str(used));
    const i64 fixed[kNumPieces] = {num_queries + 1, c.nnz,    num_queries,    c.items,         c.items,
                                   c.items + 1,     c.rows,   c.rows,         c.merge_queries, c.merge_queries + 1};
    std::copy(fixed, fixed + kNumPieces, sizes);
  }
  i64 total = 0;
  for (i64 s : sizes) total += s;
  Plan plan;
  // Every entry is written below: no zero fill first.
  plan.packed.reset(new int32_t[total]);
  plan.packed_size = total;
  int32_t* out = plan.packed.get();
  for (size_t p = 0; p < kNumPieces; ++p) {
    const PieceData& d = pieces[p];
    if (d.write) {
      (*d.write)(out);
    } else if (d.size) {
      std::memcpy(out, d.i32, d.size * sizeof(int32_t));
    }
    const Pad pad = kPieces[p].pad;
    const int32_t fill = pad == Pad::kMinusOne ? -1 : pad == Pad::kLast && d.size ? out[d.size - 1] : 0;
    std::fill(out + d.size, out + sizes[p], fill);
    out += sizes[p];
  }

  PlanStats& stats = plan.stats;
  stats.num_queries = num_queries;
  stats.planned_tokens = it.planned_tokens;
  stats.work_items = num_items;
  stats.trie_edges = it.num_edges;
  stats.partial_rows = it.partial_rows;
  stats.direct_queries = it.direct;
  stats.max_queries_per_item = std::max<i64>(1, it.max_queries);
  stats.rows = num_rows;
  stats.merge_queries = num_merges;
  stats.nnz = nnz;
  std::copy(sizes, sizes + kNumPieces, plan.piece_sizes.begin());
  plan.max_item_tokens = it.max_item_tokens;
  plan.max_page_id = max_page;
  plan.max_queries_per_item = o.capacity ? it.block_queries : std::max<i64>(1, it.max_queries);
  return plan;
}

}  // namespace

Plan plan_table(const TableView& input, const Options& o) {
  const i64 n = input.num_queries, ps = o.page_size;
  if (input.indptr_size != n + 1)
    throw std::invalid_argument("kv_indptr: expected shape [" + str(n + 1) + "] (len(kv_last_page_len) + 1), got [" +
                                str(input.indptr_size) + "]");
  if (input.nnz > INT32_MAX)
    throw std::invalid_argument("kv_indices: expected at most 2^31 - 1 page slots, got " + str(input.nnz));
  const Table t{input.kv_indptr, input.kv_indices, input.kv_last_page_len, n, input.nnz, ps};
  check_offsets(t);

  const Keys keys{t};
  i64 naive_tokens = 0;
  for (i64 i = 0; i < n; ++i)
    if (keys.length(i) > 0) naive_tokens += (keys.length(i) - 1) * ps + t.last_len[i];
  // (Sorting reads page ids as numbers only, so it may run before they are checked.)
  std::vector<i64> lcp(n + 1, 0);
  const std::vector<i64> order = sorted_queries(keys, n, lcp);  // (lcp holds the depths known shared)
  std::vector<i64> sstart(n), slen(n);
  for (i64 i = 0; i < n; ++i) {
    sstart[i] = t.indptr[order[i]];
    slen[i] = keys.length(order[i]);
  }
  for (i64 i = 1; i < n; ++i) {
    const i64 common = std::min(slen[i - 1], slen[i]), known = lcp[i];
    if (known > 0 || (common > 0 && keys.at(order[i - 1], 0) == keys.at(order[i], 0)))
      lcp[i] = known + keys.common(order[i - 1], order[i], known, common - known);
  }
  // Every page id is in some sorted query's run past its LCP with its predecessor: check those runs only.
  i64 max_page = -1, unique_tokens = 0;
  if (!dense_unique_tokens(t, keys, order, lcp, o.num_pages, max_page, unique_tokens)) {
    int32_t low = INT32_MAX, high = -1;
    for (i64 i = 0; i < n; ++i) min_max(t.indices + sstart[i] + lcp[i], slen[i] - lcp[i], low, high);
    check_page_ids(low, high, o.num_pages);
    max_page = high;
    unique_tokens = unique_tokens_of(t, keys, order, lcp, max_page);
  }
  if (!o.share_prefixes) std::fill(lcp.begin(), lcp.end(), 0);  // every query on its own

  // Internal edges: the LCP intervals (stack walk over the LCP array); then leaf edges: what each query
  // does not share with either neighbour.
  Edges e;
  std::vector<i64> depth_end;
  auto add_edge = [&](i64 d0, i64 d1, i64 lo, i64 hi) {
    e.depth.push_back(d0);
    depth_end.push_back(d1);
    e.lo.push_back(lo);
    e.hi.push_back(hi);
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
  for (size_t k = 0; k < e.lo.size(); ++k) {
    e.pages.push_back(depth_end[k] - e.depth[k]);
    e.first_page.push_back(sstart[e.lo[k]] + e.depth[k]);
    e.tail.push_back(ps - keys.used(order[e.lo[k]], depth_end[k] - 1));
  }
  const Items items = build_items(order, e, chunking(e.lo, e.hi, e.pages, e.tail, o), o);
  const PieceData table[3] = {{t.indptr, n + 1}, {t.indices, t.nnz}, {t.last_len, n}};
  Plan plan = pack(table, items, n, max_page, o);
  plan.stats.unique_tokens = unique_tokens;
  plan.stats.naive_tokens = naive_tokens;
  return plan;
}

namespace {

// A forest of nodes (the part of a TreeKVCache that a step's queries reach) and the queries on it; see
// plan_from_tree in python/treeattn/plan.py for the contract.
struct Tree {
  const std::vector<i64>&parent, &start, &end;
  const std::vector<Int32Span>& pages;
  const std::vector<i64>&owner, &query_end;
  i64 ps;

  i64 num_nodes() const { return static_cast<i64>(parent.size()); }
  i64 num_queries() const { return static_cast<i64>(owner.size()); }
  i64 first_page(i64 m) const { return start[m] / ps; }

  // Everything the walk and the table writes rely on but the forest shape, which the walk checks (bad
  // input raises, it never reads out of bounds). Page ids are checked where they are read.
  void check() const {
    const i64 m_count = num_nodes(), n = num_queries();
    // Path positions whose page index fits int32 (the table's), so no position arithmetic overflows.
    const i64 max_position = i64{INT32_MAX} * ps;
    for (i64 m = 0; m < m_count; ++m)
      if (end[m] < 0 || end[m] > max_position)
        throw std::invalid_argument("end: expected 0.." + str(max_position) + " (2^31 - 1 pages) for node " + str(m) +
                                    ", got " + str(end[m]));
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
      const i64 want = end[m] > start[m] ? ceil_div(end[m], ps) - first_page(m) : 0, count = pages[m].size;
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

// The walk of TreeKVCache.plan. Depth-first
// order of the queries: a node's subtree is contiguous, its descendants' queries first, then its own by
// decreasing end. Each node yields trie segments (page-depth range, sorted-query range); segments with the
// same query range chain along one path and merge into one edge (first-seen order is the edge order).
struct TreeWalk {
  const Tree& t;
  std::vector<i64> order, kid_ptr, kids, own_ptr, own;
  std::vector<i64> lo, hi, d0, d1, tail, tail_query;  // tail_query: whose last page the tail is (-1: none)
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
    for (std::vector<i64>* v : {&lo, &hi, &d0, &d1, &tail, &tail_query}) v->reserve(m_count + n);
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

  void add_segment(i64 l, i64 h, i64 a, i64 b, i64 tl, i64 tq = -1) {
    i64& k = slot(l, h);
    if (k >= 0) {
      d0[k] = std::min(d0[k], a);
      if (b > d1[k]) {
        d1[k] = b;
        tail[k] = tl;
        tail_query[k] = tq;
      }
      return;
    }
    k = static_cast<i64>(lo.size());
    lo.push_back(l);
    hi.push_back(h);
    d0.push_back(a);
    d1.push_back(b);
    tail.push_back(tl);
    tail_query.push_back(tq);
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
        add_segment(first, first + 1, a, f + 1, ps - rest, mine[0]);
      else if (a < f)
        add_segment(first, first + 1, a, f, 0);
      return;
    }
    if (desc_end == first && count == 0)  // nobody reads it: it would make an edge of no queries
      throw std::invalid_argument("query_owner: expected a query at or below every node, got none for node " + str(m));
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
      if (e % ps) add_segment(desc_end + i, desc_end + j, e / ps, e / ps + 1, ps - e % ps, mine[i]);
    }
  }
};

}  // namespace

Plan plan_tree(const TreeView& tree, const Options& o, Growth* growth) {
  const std::vector<i64>&parent = tree.parent, &start = tree.start, &end = tree.end;
  const std::vector<i64>&owner = tree.query_owner, &query_end = tree.query_end;
  const std::vector<Int32Span>& pages = tree.pages;
  const i64 m_count = static_cast<i64>(parent.size()), ps = o.page_size;
  if (static_cast<i64>(start.size()) != m_count || static_cast<i64>(end.size()) != m_count ||
      static_cast<i64>(pages.size()) != m_count)
    throw std::invalid_argument("tree: expected parent, start, end and pages of one length (one entry per node), got " +
                                str(m_count) + ", " + str(start.size()) + ", " + str(end.size()) + ", " +
                                str(pages.size()));
  if (query_end.size() != owner.size())
    throw std::invalid_argument("query_end: expected one entry per query (" + str(owner.size()) + "), got " +
                                str(query_end.size()));
  if (static_cast<i64>(owner.size()) >= INT32_MAX)
    throw std::invalid_argument("query_owner: expected fewer than 2^31 - 1 queries, got " + str(owner.size()));
  const Tree t{parent, start, end, pages, owner, query_end, ps};
  t.check();
  const i64 n = t.num_queries();
  const TreeWalk walk(t);

  // The table: query q reads its owner's root->owner page list, cut at ceil(query_end / ps) pages.
  std::vector<int32_t> indptr(n + 1), last_len(n);
  i64 nnz = 0, naive_tokens = 0;
  for (i64 q = 0; q < n; ++q) {
    const i64 e = query_end[q], num_pages = ceil_div(e, ps);
    if (nnz + num_pages > INT32_MAX) throw std::invalid_argument("query_end: the table would exceed 2^31 - 1 page slots");
    nnz += num_pages;
    naive_tokens += e;
    indptr[q + 1] = static_cast<int32_t>(nnz);
    last_len[q] = static_cast<int32_t>(num_pages ? e - (num_pages - 1) * ps : 0);
  }
  // Written straight into the plan's buffer (every slot: a path's nodes cover page indices 0.. without gaps).
  const std::function<void(int32_t*)> write_indices = [&](int32_t* indices) {
    for (i64 q = 0; q < n; ++q) {
      i64 limit = indptr[q + 1] - indptr[q];  // pages of the row still to write, from index 0
      for (i64 m = owner[q]; m >= 0 && limit > 0; m = parent[m]) {
        if (pages[m].size == 0) continue;  // a node without tokens: its path is its parent's
        const i64 a = t.first_page(m);
        if (limit > a) std::memcpy(indices + indptr[q] + a, pages[m].data, (limit - a) * sizeof(int32_t));
        limit = std::min(limit, a);
      }
    }
  };

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
    const int32_t* ids = pages[m].data;
    const i64 a = t.first_page(m), count = pages[m].size, reach = own_reach[m];
    const i64 full_run = std::max<i64>(0, (has_kids[m] ? end[m] : reach) / ps - a);
    const i64 part = full_run < count ? std::max<i64>(0, reach - (a + full_run) * ps) : 0;
    const i64 read = full_run + (part > 0);
    // The largest read id is the plan's max_page_id; every id must be >= 0. (This pass over every page a step
    // reads is plan_tree's largest own cost on little-sharing trees.)
    int32_t low = INT32_MAX, high = -1, unread_high = -1;
    min_max(ids, read, low, high);
    min_max(ids + read, count - read, low, unread_high);
    if (low < 0) throw std::invalid_argument("pages: expected page ids >= 0, got " + str(low) + " in node " + str(m));
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
    e.first_page.push_back(indptr[walk.order[walk.lo[k]]] + walk.d0[k]);
  }
  Chunking cut = chunking(e.lo, e.hi, e.pages, e.tail, o);
  const Items items = build_items(walk.order, e, cut, o);
  const PieceData table[3] = {{indptr.data(), n + 1}, {nullptr, nnz, &write_indices},
                              {last_len.data(), n}};
  Plan plan = pack(table, items, n, max_page, o);
  plan.stats.unique_tokens = unique_tokens;
  plan.stats.naive_tokens = naive_tokens;
  if (growth) {
    Growth& g = *growth;
    g.options = o;
    g.query_end = query_end;
    g.owner = owner;
    g.own_ptr = walk.own_ptr;
    g.own = walk.own;
    g.has_kids = std::move(has_kids);
    g.edge_lo = walk.lo;
    g.edge_hi = walk.hi;
    g.edge_pages = std::move(e.pages);
    g.edge_tail = walk.tail;
    g.edge_tail_query = walk.tail_query;
    g.edge_blocks = std::move(cut.blocks);
    g.edge_chunks = std::move(cut.chunks);
    g.edge_chunk_pages = std::move(cut.chunk_pages);
    g.last_len_offset = plan.piece_sizes[0] + plan.piece_sizes[1];
    g.item_tokens_offset = g.last_len_offset + plan.piece_sizes[2] + plan.piece_sizes[3];
    g.num_items = plan.stats.work_items;
    g.planned_tokens = plan.stats.planned_tokens;
    g.unique_tokens = unique_tokens;
    g.naive_tokens = naive_tokens;
  }
  return plan;
}

std::optional<GrowthStats> patch_growth(Growth& g, const int32_t* packed, int32_t* out, i64 packed_size,
                                        const std::vector<i64>& query_end) {
  const i64 n = static_cast<i64>(g.query_end.size()), ps = g.options.page_size;
  if (static_cast<i64>(query_end.size()) != n || g.item_tokens_offset + g.num_items > packed_size) return std::nullopt;
  // Every change is growth inside a last page that stays partial, on a node without children (whose pages
  // no other node continues, so the distinct tokens grow by the growth of each node's farthest query).
  i64 growth_naive = 0;
  for (i64 q = 0; q < n; ++q) {
    const i64 before = g.query_end[q], after = query_end[q];
    if (after == before) continue;
    const i64 m = g.owner[q];
    if (after < before || m < 0 || g.has_kids[m] || after / ps != before / ps || before % ps == 0 || after % ps == 0)
      return std::nullopt;
    growth_naive += after - before;
  }
  // Each node's queries keep their order (by decreasing end) and their runs of equal ends: the same rows and
  // the same partial-page edges.
  const i64 m_count = static_cast<i64>(g.own_ptr.size()) - 1;
  i64 growth_unique = 0;
  for (i64 m = 0; m < m_count; ++m) {
    const i64 first = g.own_ptr[m], last = g.own_ptr[m + 1];
    if (first == last) continue;
    for (i64 i = first + 1; i < last; ++i) {
      const i64 a = g.own[i - 1], b = g.own[i];
      if ((g.query_end[a] == g.query_end[b]) != (query_end[a] == query_end[b]) || query_end[a] < query_end[b])
        return std::nullopt;
    }
    // (the first own query has the largest end: the node's reach)
    growth_unique += query_end[g.own[first]] - g.query_end[g.own[first]];
  }
  // The new tails, and the same chunks under them.
  std::vector<i64> tail(g.edge_tail);
  for (size_t k = 0; k < tail.size(); ++k)
    if (g.edge_tail_query[k] >= 0) tail[k] = ps - query_end[g.edge_tail_query[k]] % ps;
  const Chunking cut = chunking(g.edge_lo, g.edge_hi, g.edge_pages, tail, g.options);
  if (cut.chunks != g.edge_chunks || cut.chunk_pages != g.edge_chunk_pages) return std::nullopt;

  // Write: each changed query's last page length, and the last chunk of each block of an edge whose tail moved.
  if (out != packed) std::memcpy(out, packed, packed_size * sizeof(int32_t));
  int32_t* last_len = out + g.last_len_offset;
  int32_t* item_tokens = out + g.item_tokens_offset;
  for (i64 q = 0; q < n; ++q) last_len[q] += static_cast<int32_t>(query_end[q] - g.query_end[q]);
  i64 item = 0;
  for (size_t k = 0; k < tail.size(); ++k) {
    const i64 grown = g.edge_tail[k] - tail[k];
    if (grown)
      for (i64 b = 0; b < g.edge_blocks[k]; ++b)
        item_tokens[item + (b + 1) * g.edge_chunks[k] - 1] += static_cast<int32_t>(grown);
    g.planned_tokens += grown * g.edge_blocks[k];
    item += g.edge_blocks[k] * g.edge_chunks[k];
  }
  i64 max_item_tokens = 0;
  for (i64 i = 0; i < g.num_items; ++i) max_item_tokens = std::max<i64>(max_item_tokens, item_tokens[i]);
  g.edge_tail = std::move(tail);
  g.query_end = query_end;
  g.unique_tokens += growth_unique;
  g.naive_tokens += growth_naive;
  return GrowthStats{g.planned_tokens, g.unique_tokens, g.naive_tokens, max_item_tokens};
}

}  // namespace treeattn::planner
