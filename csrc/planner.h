// treeattn's host planner, the core: a decode step's paged table (or the tree behind it) -> one packed plan.
// Plain C++17 (no Python): planner.cpp implements it, planner_bindings.cpp exposes it as treeattn._planner.
//
// Two entry points, one back end:
// - plan_table (treeattn.plan): validate the CSR table; key every page slot by (page id, tokens used); sort
//   queries lexicographically by key lists (multikey sort that skips common runs with memcmp); LCPs of
//   neighbours; LCP-interval stack walk -> compressed-trie edges.
// - plan_tree (TreeKVCache.plan): the cache knows its tree, so the edges come from a walk of the queried
//   subtree (O(nodes + queries): no sorting, no page comparisons) and the table is written from the nodes'
//   page lists. patch_growth: the next decode step of such a plan when only lengths changed (each query grew
//   inside its last page): the last plan's buffer with its lengths patched, no walk.
// Back end: edges -> chunks x query blocks -> work items, rows, partial-state rows (root->leaf per query) and
// the stage-2 merge CSR, packed with the table into one int32 buffer laid out as kPieces says (padded to a
// fixed capacity when one is given); python/treeattn/plan.py splits it by the piece sizes and never restates
// the layout.
//
// This is the only place that defines the packed layout and the sizing policy (kSizing). Every input is
// validated (bad input throws std::invalid_argument naming the argument, never reads out of bounds); the plan
// owns copies of everything it keeps. Cost: O(nnz + n log n) time and O(nnz + n) memory, whatever the page
// ids are.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace treeattn::planner {

using i64 = int64_t;

// ---- the sizing policy (what the work items look like; never what they compute) ----

struct SizingPolicy {
  // Stage-1 M tile (queries x GQA group heads of one KV head) the planner aims for; 64 rows keep the fp32
  // accumulator of a 128-wide head in registers. The Triton launchers' largest tile (configs.MAX_TILE_ROWS).
  i64 target_rows_per_item = 64;
  // An item's partial-state traffic is ~2 * rows / chunk_tokens of its KV traffic: 16 tokens per row keeps
  // it near 12%.
  i64 tokens_per_partial_row = 16;
  i64 min_chunk_tokens = 128;
  // Stage-1 programs per SM to aim for, so that uneven items still fill the machine.
  i64 programs_per_sm = 4;
  // Head counts assumed when the caller gives no hints (GQA 32 query / 8 KV heads).
  i64 default_group = 4;
  i64 default_kv_heads = 8;
  // SMs assumed when the device has none to ask (an H100/H200's count).
  i64 default_num_sms = 132;
};
inline constexpr SizingPolicy kSizing{};

// ---- the packed plan layout ----

// The plan's int32 arrays, in buffer order. Under a capacity each piece has a fixed size and is padded so
// that padding reads and writes nothing: padding items have no tokens and repeat the last row pointer
// (no rows), padding rows write nowhere (-1), padding merge entries have query -1 and no partials.
enum class Pad { kNone, kZero, kMinusOne, kLast };
struct PieceSpec {
  const char* name;
  Pad pad;
};
inline constexpr PieceSpec kPieces[] = {
    {"kv_indptr", Pad::kNone},          // [n + 1] the table, as validated and copied
    {"kv_indices", Pad::kZero},         // [nnz] page ids
    {"kv_last_page_len", Pad::kNone},   // [n]
    {"item_page_ptr", Pad::kZero},      // [items] offset into kv_indices of the item's first page
    {"item_num_tokens", Pad::kZero},    // [items] KV tokens the item reads
    {"item_row_ptr", Pad::kLast},       // [items + 1] the item's rows
    {"row_query", Pad::kZero},          // [rows] query of each (item, query) row
    {"row_dest", Pad::kMinusOne},       // [rows] partial row it writes, -1: the output directly
    {"merge_query", Pad::kMinusOne},    // [merges] queries stage 2 writes (several partials, or empty KV)
    {"merge_ptr", Pad::kLast},          // [merges + 1] each merge query's partial rows, root->leaf
};
inline constexpr size_t kNumPieces = sizeof(kPieces) / sizeof(kPieces[0]);

// ---- what a plan is asked for ----

// Fixed piece sizes (treeattn.PlanCapacity): items, rows, partial_rows, merge_queries, nnz.
struct Capacity {
  i64 items, rows, partial_rows, merge_queries, nnz;
};

// What a plan is asked for, beyond its table. Build it with make_options, which validates it.
struct Options {
  i64 page_size = 0;
  i64 num_pages = -1;  // pool size bounding page ids; -1: no bound
  bool share_prefixes = true;
  i64 group = kSizing.default_group;  // query heads per KV head (rows per query)
  i64 kv_heads = kSizing.default_kv_heads;
  i64 num_sms = kSizing.default_num_sms;
  std::optional<Capacity> capacity;
  i64 max_queries_per_item = 0;  // > 0: no item holds more queries (refill of a fixed-capacity plan)
};

// Options from the arguments of treeattn.plan; std::invalid_argument names the argument out of range.
Options make_options(i64 page_size, std::optional<i64> num_pages, bool share_prefixes,
                     std::optional<i64> num_qo_heads, std::optional<i64> num_kv_heads, i64 num_sms,
                     std::optional<Capacity> capacity, std::optional<i64> max_queries_per_item);

// A CSR page table, borrowed: kv_indptr[indptr_size], kv_indices[nnz], kv_last_page_len[num_queries].
struct TableView {
  const int32_t* kv_indptr;
  i64 indptr_size;
  const int32_t* kv_indices;
  i64 nnz;
  const int32_t* kv_last_page_len;
  i64 num_queries;
};

// A borrowed int32 array.
struct Int32Span {
  const int32_t* data;
  i64 size;
};

// A forest of nodes (the part of a TreeKVCache that a step's queries reach) and the queries on it, borrowed;
// see plan_from_tree in python/treeattn/plan.py for the contract. One entry per node in parent, start, end
// and pages (its page ids), one per query in query_owner and query_end.
struct TreeView {
  const std::vector<i64>& parent;
  const std::vector<i64>& start;
  const std::vector<i64>& end;
  const std::vector<Int32Span>& pages;
  const std::vector<i64>& query_owner;
  const std::vector<i64>& query_end;
};

// ---- the plan ----

struct PlanStats {
  i64 num_queries, planned_tokens, work_items, trie_edges, partial_rows, direct_queries, max_queries_per_item,
      rows, merge_queries, nnz;
  i64 unique_tokens, naive_tokens;  // distinct KV tokens the step reads; tokens read once per query
};

struct Plan {
  std::unique_ptr<int32_t[]> packed;  // the pieces in kPieces order
  i64 packed_size = 0;
  std::array<i64, kNumPieces> piece_sizes{};
  PlanStats stats{};
  i64 max_item_tokens = 0;
  i64 max_page_id = -1;
  // The kernels' query block: the plan's largest item, or under a capacity the largest any refill can make.
  i64 max_queries_per_item = 1;
};

// What a tree plan's query lengths feed, kept so that the next decode step, whose queries only grew inside
// their last pages, is patched into a copy of the plan (patch_growth) instead of planned again. Opaque: made by
// plan_tree, updated by every patch it accepts.
struct Growth {
  Options options;
  std::vector<i64> query_end, owner, own_ptr, own;  // own: each node's queries in walk order (CSR by node)
  std::vector<uint8_t> has_kids;
  // Per edge: its sorted-query range, pages, unused slots in its last page, the query whose last page that is
  // (-1: a full-page edge, whose tail no length changes), and its query blocks and chunks.
  std::vector<i64> edge_lo, edge_hi, edge_pages, edge_tail, edge_tail_query, edge_blocks, edge_chunks,
      edge_chunk_pages;
  i64 last_len_offset = 0, item_tokens_offset = 0, num_items = 0;
  i64 planned_tokens = 0, unique_tokens = 0, naive_tokens = 0;
};

// The stats a patch changes.
struct GrowthStats {
  i64 planned_tokens, unique_tokens, naive_tokens, max_item_tokens;
};

// The plan of a CSR page table (treeattn.plan).
Plan plan_table(const TableView& table, const Options& options);
// The plan of a known tree (TreeKVCache.plan): the table its paths give, with the stats plan_table finds on it.
// With `growth`, also what its lengths feed (for patch_growth).
Plan plan_tree(const TreeView& tree, const Options& options, Growth* growth = nullptr);
// Writes into out[0:packed_size) (which may be packed itself) packed[0:packed_size), the plan `growth`
// describes, patched into the plan of the same tree after its queries grew to query_end, and returns the changed
// stats, when that plan differs in lengths only: every query that changed grew inside its last page, which it
// neither fills nor started (end % page_size != 0 before and after), on a node without children, keeping each
// node's queries in their order, and the items keep their chunks. Else nullopt, nothing written, growth unchanged. The caller guarantees everything but the
// query ends (the nodes, their parents, starts and page lists, query owners) is as it was; only then is the
// patch the plan.
std::optional<GrowthStats> patch_growth(Growth& growth, const int32_t* packed, int32_t* out, i64 packed_size,
                                        const std::vector<i64>& query_end);

}  // namespace treeattn::planner
