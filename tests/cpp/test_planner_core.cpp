// The planner core without Python (csrc/planner.h): scripts/sanitize_planner.sh builds this with the core alone,
// under ASan/UBSan, and runs it. The exhaustive checks are the Python tests (tests/test_plan*.py, the fuzz
// tests) against the binding; this one shows the core stands on its own and agrees with itself across its two
// entry points.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "planner.h"

namespace planner = treeattn::planner;
using planner::i64;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

template <class Fn>
void check_throws(Fn&& fn, const std::string& message_start, const std::string& what) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    check(std::string(e.what()).rfind(message_start, 0) == 0, what + ": message '" + e.what() + "'");
    return;
  }
  check(false, what + ": no std::invalid_argument");
}

// The pieces of a plan, by name.
std::vector<int32_t> piece(const planner::Plan& plan, const std::string& name) {
  i64 offset = 0;
  for (size_t p = 0; p < planner::kNumPieces; ++p) {
    if (name == planner::kPieces[p].name)
      return std::vector<int32_t>(plan.packed.get() + offset, plan.packed.get() + offset + plan.piece_sizes[p]);
    offset += plan.piece_sizes[p];
  }
  std::abort();
}

}  // namespace

int main() {
  const i64 page_size = 16;
  const planner::Options options =
      planner::make_options(page_size, std::nullopt, true, 32, 8, 132, std::nullopt, std::nullopt);

  // Two branches that share two full pages (0, 1), then read 3 and 7 tokens of pages 2 and 3.
  const std::vector<int32_t> indptr{0, 3, 6}, indices{0, 1, 2, 0, 1, 3}, last_len{3, 7};
  const planner::TableView table{indptr.data(), 3, indices.data(), 6, last_len.data(), 2};
  const planner::Plan from_table = planner::plan_table(table, options);
  check(from_table.stats.unique_tokens == 2 * page_size + 3 + 7, "plan_table: the shared pages count once");
  check(from_table.stats.naive_tokens == 2 * (2 * page_size) + 3 + 7, "plan_table: naive tokens");
  check(from_table.max_page_id == 3, "plan_table: max_page_id");
  check(piece(from_table, "kv_indices") == indices, "plan_table: the table is copied into the plan");

  // The same two branches as a tree: a root of 32 tokens, two children of 3 and 7.
  const std::vector<i64> parent{-1, 0, 0}, start{0, 32, 32}, end{32, 35, 39}, owner{1, 2}, query_end{35, 39};
  const std::vector<int32_t> root_pages{0, 1}, left_pages{2}, right_pages{3};
  const std::vector<planner::Int32Span> pages{{root_pages.data(), 2}, {left_pages.data(), 1}, {right_pages.data(), 1}};
  const planner::Plan from_tree = planner::plan_tree({parent, start, end, pages, owner, query_end}, options);
  check(piece(from_tree, "kv_indptr") == indptr && piece(from_tree, "kv_indices") == indices &&
            piece(from_tree, "kv_last_page_len") == last_len,
        "plan_tree: writes the table its paths give");
  check(from_tree.stats.unique_tokens == from_table.stats.unique_tokens &&
            from_tree.stats.planned_tokens == from_table.stats.planned_tokens &&
            from_tree.stats.trie_edges == from_table.stats.trie_edges,
        "plan_tree: the stats plan_table finds on that table");

  // Distinct pages however the ids come: runs of consecutive ids longer and shorter than the 16-id blocks the
  // run search compares at once, lone ids, ids repeated at other depths (dense ids: a flag per id), and ids up
  // to INT32_MAX (sparse: hashed slots). Every list's last page is full: tokens = page_size x distinct ids.
  const auto check_distinct = [&](const std::vector<std::vector<int32_t>>& rows, const std::string& what) {
    std::vector<int32_t> ptr{0}, ids, full;
    for (const auto& row : rows) {
      ids.insert(ids.end(), row.begin(), row.end());
      ptr.push_back(static_cast<int32_t>(ids.size()));
      full.push_back(static_cast<int32_t>(page_size));
    }
    std::vector<int32_t> distinct(ids);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    const i64 n = static_cast<i64>(rows.size());
    const planner::Plan plan = planner::plan_table(
        {ptr.data(), n + 1, ids.data(), static_cast<i64>(ids.size()), full.data(), n}, options);
    check(plan.stats.unique_tokens == page_size * static_cast<i64>(distinct.size()), "plan_table: " + what);
    check(plan.max_page_id == distinct.back(), "plan_table: max_page_id of " + what);
  };
  std::vector<int32_t> run40, block16{7};  // (block16: a repeat at its end)
  for (int32_t id = 100; id < 140; ++id) run40.push_back(id);
  block16.insert(block16.begin(), 16, 0);
  for (int32_t id = 0; id < 16; ++id) block16[id] = id;
  check_distinct({run40, block16, {120, 3, 200, 17, 18, 19, 150}, {138, 139, 140, 141}}, "dense ids, runs and repeats");
  check_distinct({{INT32_MAX - 1, INT32_MAX, 0, 1}, {5, INT32_MAX}, run40}, "sparse ids up to INT32_MAX");

  // Bad input throws, naming the argument.
  const std::vector<int32_t> bad_indices{0, 1, 2, 0, 1, -3};
  check_throws([&] { planner::plan_table({indptr.data(), 3, bad_indices.data(), 6, last_len.data(), 2}, options); },
               "kv_indices: expected page ids >= 0", "negative page id");
  check_throws([&] { planner::plan_table({indptr.data(), 2, indices.data(), 6, last_len.data(), 2}, options); },
               "kv_indptr: expected shape [3]", "short kv_indptr");
  check_throws([&] { planner::make_options(0, std::nullopt, true, std::nullopt, std::nullopt, 132, std::nullopt,
                                           std::nullopt); },
               "page_size: expected an int in [1, ", "page_size 0");
  const std::vector<i64> cycle{2, 0, 1};
  check_throws([&] { planner::plan_tree({cycle, start, end, pages, owner, query_end}, options); }, "start: expected",
               "a parent cycle");

  if (failures) return 1;
  std::printf("planner core (no Python): all checks passed\n");
  return 0;
}
