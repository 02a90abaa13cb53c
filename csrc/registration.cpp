// Operator schemas (TORCH_LIBRARY) and their CUDA implementations (TORCH_LIBRARY_IMPL).
//
// The ops live in the `treeattn` namespace: torch.ops.treeattn.<name>. Fake (meta) kernels for
// torch.compile are registered in Python, in treeattn/_ext.py (set_python_module below tells
// torch where to find them if the library is loaded without that module).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace {

// Thin adapters: the dispatcher passes at::Tensor, the launchers take at::TensorBase.
void merge_state_cuda(const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
                      const at::Tensor& lse_b, const at::Tensor& o_out, const at::Tensor& lse_out) {
  treeattn::merge_state_cuda(o_a, lse_a, o_b, lse_b, o_out, lse_out);
}

void kv_write_cuda(const at::Tensor& slots, const at::Tensor& k, const std::optional<at::Tensor>& v,
                   const at::Tensor& pool, int64_t layer) {
  treeattn::kv_write_cuda(slots, k, v.has_value() ? &v.value() : nullptr, pool, layer);
}

}  // namespace

TORCH_LIBRARY(treeattn, m) {
  m.set_python_module("treeattn._ext");
  // Exact merge of two attention states (o, natural-log lse); writes o_out and lse_out.
  m.def(
      "merge_state_cuda(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, "
      "Tensor(a!) o_out, Tensor(b!) lse_out) -> ()");
  // TreeKVCache write: pool[0, layer] (and pool[1, layer] for GQA) at flat slots = k (and v).
  m.def("kv_write_cuda(Tensor slots, Tensor k, Tensor? v, Tensor(a!) pool, int layer) -> ()");
}

TORCH_LIBRARY_IMPL(treeattn, CUDA, m) {
  m.impl("kv_write_cuda", &kv_write_cuda);
  m.impl("merge_state_cuda", &merge_state_cuda);
}

// `import treeattn._C` loads this shared library, which runs the static registrations above.
// The module itself is empty: every op is reached through torch.ops.treeattn.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      NULL,  // m_doc
      -1,    // m_size
      NULL,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}
