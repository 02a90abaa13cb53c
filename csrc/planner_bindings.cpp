// treeattn._planner: the Python binding of the host planner core (planner.h). It converts and checks the
// arguments (TypeError for a wrong type, naming the argument; the core raises ValueError for a wrong value),
// borrows the arrays without copying, and returns the plan as a dict around a zero-copy numpy buffer.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "planner.h"

namespace py = pybind11;
using treeattn::planner::i64;
namespace planner = treeattn::planner;

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style>;

std::string str(i64 v) { return std::to_string(v); }
std::string type_name(const py::handle& obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

// An int (or anything with __index__ but bool) as int64, else TypeError / ValueError naming `name`
// (`name[index]` for an element of a sequence).
i64 int_value(const py::handle& obj, const char* name, i64 index = -1) {
  const auto where = [&] { return std::string(name) + (index >= 0 ? "[" + str(index) + "]" : ""); };
  if (PyLong_CheckExact(obj.ptr())) {  // the usual case, without a new reference
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
    if (!overflow) return value;
    throw std::invalid_argument(where() + ": expected an int that fits int64, got " + std::string(py::repr(obj)));
  }
  if (PyBool_Check(obj.ptr())) throw py::type_error(where() + ": expected an int, got bool");
  const py::object number = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!number) {
    PyErr_Clear();
    throw py::type_error(where() + ": expected an int, got " + type_name(obj));
  }
  return int_value(number, name, index);
}

planner::Options make_options(i64 page_size, std::optional<i64> num_pages, bool share_prefixes,
                              std::optional<i64> num_qo_heads, std::optional<i64> num_kv_heads, i64 num_sms,
                              const py::object& capacity, std::optional<i64> max_queries_per_item) {
  std::optional<planner::Capacity> fixed;
  if (!capacity.is_none()) {
    planner::Capacity c{};
    const std::pair<const char*, i64*> fields[] = {{"items", &c.items}, {"rows", &c.rows},
                                                   {"partial_rows", &c.partial_rows},
                                                   {"merge_queries", &c.merge_queries}, {"nnz", &c.nnz}};
    for (auto [name, value] : fields) {
      if (!py::hasattr(capacity, name))
        throw py::type_error("capacity: expected a PlanCapacity (items, rows, partial_rows, merge_queries, nnz), "
                             "got " + type_name(capacity));
      const std::string field = std::string("capacity.") + name;
      *value = int_value(capacity.attr(name), field.c_str());
    }
    fixed = c;
  }
  return planner::make_options(page_size, num_pages, share_prefixes, num_qo_heads, num_kv_heads, num_sms, fixed,
                               max_queries_per_item);
}

// A 1-D int32 numpy array, C-contiguous: a strided or broadcast (stride-0) view is copied, so the planner
// and the plan read exactly the values it was given. Other dtypes are refused, never cast (an int64 2^32 + 1
// must not become page 1).
Int32Array int32_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a 1-D int32 numpy array, got " + type_name(obj));
  const auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.dtype().kind() != 'i' || arr.dtype().itemsize() != 4)
    throw py::type_error(std::string(name) + ": expected dtype int32, got " + std::string(py::str(arr.dtype())));
  if (arr.ndim() != 1) {
    std::string shape;
    for (py::ssize_t d = 0; d < arr.ndim(); ++d) shape += (d ? ", " : "") + str(arr.shape(d));
    throw std::invalid_argument(std::string(name) + ": expected a 1-D array, got shape [" + shape + "]");
  }
  auto out = Int32Array::ensure(arr);
  if (!out) throw py::error_already_set();
  return out;
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
      // PyBUF_ND: only a C-contiguous exporter succeeds (a strided view raises BufferError).
      if (PyObject_GetBuffer(obj.ptr(), &views_.back(), PyBUF_ND | PyBUF_FORMAT) != 0) {
        PyErr_Clear();
        views_.pop_back();
        release();
        throw py::type_error("pages: expected contiguous 1-D int32 buffers (array('i') or numpy int32), got " +
                             type_name(obj));
      }
      const Py_buffer& v = views_.back();
      // (No std::string per buffer: a step passes one buffer per node, hundreds of them.)
      const char* format = v.format ? v.format : "B";
      const size_t length = std::strlen(format);
      const char kind = length ? format[length - 1] : 'B';
      const bool native = length == 1 || format[0] == '@' || format[0] == '=' ||
                          (format[0] == '<' && PY_LITTLE_ENDIAN) || (format[0] == '>' && PY_BIG_ENDIAN);
      if (v.ndim != 1 || v.itemsize != 4 || (kind != 'i' && kind != 'l') || length > 2 || !native) {
        std::string got = "format '" + std::string(format) + "' with " + str(v.ndim) + " dims and itemsize " +
                          str(v.itemsize);
        release();
        throw py::type_error("pages: expected 1-D int32 buffers (array('i') or numpy int32), got " + got);
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

// A sequence of ints (TreeKVCache.plan passes lists) as int64s: PySequence_Fast, then int_value per item, a few
// ns each (pybind's generic list caster costs several times that per item).
std::vector<i64> int64s(const py::handle& seq, const char* name) {
  py::object fast = py::reinterpret_steal<py::object>(
      PySequence_Fast(seq.ptr(), (std::string(name) + ": expected a sequence of ints").c_str()));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  std::vector<i64> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = int_value(items[i], name, i);
  return out;
}

// The plan as the dict python/treeattn/plan.py reads: packed (int32 buffer, pieces in PIECES order; numpy owns
// the planner's buffer, no copy), piece_sizes, stats, max_item_tokens, max_page_id, max_queries_per_item.
py::dict to_dict(planner::Plan&& plan) {
  int32_t* data = plan.packed.release();
  const py::capsule owner(data, [](void* p) { delete[] static_cast<int32_t*>(p); });
  const planner::PlanStats& s = plan.stats;
  py::dict stats;
  stats["num_queries"] = s.num_queries;
  stats["planned_tokens"] = s.planned_tokens;
  stats["work_items"] = s.work_items;
  stats["trie_edges"] = s.trie_edges;
  stats["partial_rows"] = s.partial_rows;
  stats["direct_queries"] = s.direct_queries;
  stats["max_queries_per_item"] = s.max_queries_per_item;
  stats["rows"] = s.rows;
  stats["merge_queries"] = s.merge_queries;
  stats["nnz"] = s.nnz;
  stats["unique_tokens"] = s.unique_tokens;
  stats["naive_tokens"] = s.naive_tokens;
  py::dict result;
  result["packed"] = Int32Array(plan.packed_size, data, owner);
  result["piece_sizes"] = std::vector<i64>(plan.piece_sizes.begin(), plan.piece_sizes.end());
  result["stats"] = stats;
  result["max_item_tokens"] = plan.max_item_tokens;
  result["max_page_id"] = plan.max_page_id;
  result["max_queries_per_item"] = plan.max_queries_per_item;
  return result;
}

py::dict plan_table(const py::handle& kv_indptr, const py::handle& kv_indices, const py::handle& kv_last_page_len,
                    const planner::Options& options) {
  const Int32Array indptr = int32_array(kv_indptr, "kv_indptr");
  const Int32Array indices = int32_array(kv_indices, "kv_indices");
  const Int32Array last_len = int32_array(kv_last_page_len, "kv_last_page_len");
  const planner::TableView table{indptr.data(),  indptr.shape(0),   indices.data(),
                                 indices.shape(0), last_len.data(), last_len.shape(0)};
  return to_dict(planner::plan_table(table, options));
}

py::dict plan_tree(const py::handle& parent, const py::handle& start, const py::handle& end, const py::list& pages,
                   const py::handle& query_owner, const py::handle& query_end, const planner::Options& options,
                   bool keep_growth) {
  const std::vector<i64> parents = int64s(parent, "parent"), starts = int64s(start, "start"), ends = int64s(end, "end");
  const std::vector<i64> owners = int64s(query_owner, "query_owner"), query_ends = int64s(query_end, "query_end");
  const Int32Views views(pages);
  std::vector<planner::Int32Span> spans(pages.size());
  for (size_t m = 0; m < spans.size(); ++m) spans[m] = {views.data(m), views.size(m)};
  if (!keep_growth) return to_dict(planner::plan_tree({parents, starts, ends, spans, owners, query_ends}, options));
  auto growth = std::make_unique<planner::Growth>();
  py::dict result =
      to_dict(planner::plan_tree({parents, starts, ends, spans, owners, query_ends}, options, growth.get()));
  result["growth"] = py::cast(std::move(growth));
  return result;
}

// (planned_tokens, unique_tokens, naive_tokens, max_item_tokens, patched): patched is `packed` itself (patched
// in place) or, with copy, a new array; None when the step needs a new plan (nothing written, nothing allocated
// that outlives the call).
py::object patch_growth(planner::Growth& growth, const py::handle& packed, const py::handle& query_end, bool copy) {
  if (!py::isinstance<py::array>(packed))
    throw py::type_error("packed: expected a writable 1-D int32 numpy array, got " + type_name(packed));
  auto arr = py::reinterpret_borrow<py::array>(packed);
  if (arr.dtype().kind() != 'i' || arr.dtype().itemsize() != 4 || arr.ndim() != 1 || !arr.writeable() ||
      !(arr.flags() & py::array::c_style))
    throw py::type_error("packed: expected a writable, contiguous 1-D int32 numpy array");
  const std::vector<i64> ends = int64s(query_end, "query_end");
  const i64 size = arr.shape(0);
  int32_t* data = static_cast<int32_t*>(arr.mutable_data());
  std::unique_ptr<int32_t[]> fresh(copy ? new int32_t[size] : nullptr);  // (not touched unless the patch applies)
  const auto stats = planner::patch_growth(growth, data, copy ? fresh.get() : data, size, ends);
  if (!stats) return py::none();
  py::object out = arr;
  if (copy) {
    int32_t* raw = fresh.release();
    out = Int32Array(size, raw, py::capsule(raw, [](void* p) { delete[] static_cast<int32_t*>(p); }));
  }
  return py::make_tuple(stats->planned_tokens, stats->unique_tokens, stats->naive_tokens, stats->max_item_tokens,
                        out);
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
  using planner::kNumPieces, planner::kPieces, planner::kSizing;
  m.doc() = "treeattn host planner: a decode step's paged table (or the tree behind it) -> one packed plan buffer";
  py::tuple pieces(kNumPieces);
  for (size_t p = 0; p < kNumPieces; ++p) pieces[p] = kPieces[p].name;
  m.attr("PIECES") = pieces;
  // The sizing policy, read by the Python side too (the launchers' tile rows, the default SM count).
  py::dict sizing;
  sizing["target_rows_per_item"] = kSizing.target_rows_per_item;
  sizing["tokens_per_partial_row"] = kSizing.tokens_per_partial_row;
  sizing["min_chunk_tokens"] = kSizing.min_chunk_tokens;
  sizing["programs_per_sm"] = kSizing.programs_per_sm;
  sizing["default_group"] = kSizing.default_group;
  sizing["default_kv_heads"] = kSizing.default_kv_heads;
  sizing["default_num_sms"] = kSizing.default_num_sms;
  m.attr("SIZING") = sizing;

  py::class_<planner::Options>(m, "Options",
                               "What a plan is asked for beyond its table; validated on construction (ValueError).")
      .def(py::init(&make_options), py::kw_only(), py::arg("page_size"), py::arg("num_pages") = py::none(),
           py::arg("share_prefixes") = true, py::arg("num_qo_heads") = py::none(),
           py::arg("num_kv_heads") = py::none(), py::arg("num_sms") = kSizing.default_num_sms,
           py::arg("capacity") = py::none(), py::arg("max_queries_per_item") = py::none())
      .def_readonly("page_size", &planner::Options::page_size)
      .def_property_readonly("has_capacity", [](const planner::Options& o) { return o.capacity.has_value(); });

  const char* returns =
      "Returns a dict: packed (int32 buffer, pieces in PIECES order), piece_sizes, stats, max_item_tokens, "
      "max_page_id, max_queries_per_item (the kernels' query-block bound).";
  m.def("plan_table", &plan_table, py::arg("kv_indptr"), py::arg("kv_indices"), py::arg("kv_last_page_len"),
        py::arg("options"), (std::string("Plan a CSR page table (1-D int32 numpy arrays). ") + returns).c_str());
  m.def("plan_tree", &plan_tree, py::arg("parent"), py::arg("start"), py::arg("end"), py::arg("pages"),
        py::arg("query_owner"), py::arg("query_end"), py::arg("options"), py::kw_only(),
        py::arg("keep_growth") = false,
        (std::string("Plan a known tree (TreeKVCache.plan; contract: treeattn.plan.plan_from_tree). ") + returns +
         " keep_growth: the dict also holds growth, what the plan's lengths feed (for patch_growth).")
            .c_str());
  py::class_<planner::Growth>(m, "Growth", "What a tree plan's query lengths feed (opaque; see patch_growth).");
  m.def("patch_growth", &patch_growth, py::arg("growth"), py::arg("packed"), py::arg("query_end"), py::kw_only(),
        py::arg("copy"),
        "Patch packed (the plan growth describes; in place, or with copy into a new array) into the plan of the "
        "same tree whose queries grew to query_end, when only lengths change (growth inside last pages that stay "
        "partial, same chunks): returns (planned_tokens, unique_tokens, naive_tokens, max_item_tokens, patched) "
        "and updates growth; else None, nothing written. Everything but the query ends must be as when growth "
        "was made.");
}
