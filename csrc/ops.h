// Host-side entry points of the CUDA ops, shared by registration.cpp and the .cu files.
//
// Launchers take at::TensorBase so that the .cu files only need ATen/core/TensorBase.h
// (cheap to compile) instead of the full at::Tensor API; at::Tensor converts implicitly.
// To add an op: declare its launcher here, define it in a new csrc/<op>.cu, add the schema
// (m.def) and the CUDA impl (m.impl) in registration.cpp, the .cu to CUDA_SOURCES in
// csrc/build_config.py (setup.py and CMakeLists.txt read it), and the op's name to OPS and a
// register_fake in python/treeattn/_ext.py.
#pragma once

#include <ATen/core/TensorBase.h>

namespace treeattn {

// o_out = exact merge of two attention states; see merge_state.cu.
void merge_state_cuda(const at::TensorBase& o_a, const at::TensorBase& lse_a,
                      const at::TensorBase& o_b, const at::TensorBase& lse_b,
                      const at::TensorBase& o_out, const at::TensorBase& lse_out);

// pool[0, layer] (and pool[1, layer] when v is given) at flat slots = k (v): the TreeKVCache
// write of one step, one launch; see kv_write.cu. v null for an MLA pool.
void kv_write_cuda(const at::TensorBase& slots, const at::TensorBase& k, const at::TensorBase* v,
                   const at::TensorBase& pool, int64_t layer);

}  // namespace treeattn
