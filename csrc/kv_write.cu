// One-launch KV write of a TreeKVCache step: scatter the new tokens' K and V rows (or, for MLA, the one
// latent row) into one layer of the stacked paged pool.
//
//   pool[0, layer].flatten(0, 1)[slots[i]] = k[i]      (and pool[1, layer]... = v[i] when v is given)
//
// slots: int64 [n] flat slots (page * page_size + offset); a slot outside [0, num_pages * page_size) is
// skipped: a negative slot is padding, and no slot writes outside the layer (TreeKVCache.write range-checks
// slots on the host where it can; this bound holds where it cannot, e.g. inside a captured CUDA graph).
// k, v: [n, H, D] (GQA) or [n, D] (MLA, v absent), the pool's dtype, contiguous in the last dim; the
// other dims may have any strides. pool: [C, num_layers, num_pages, page_size, H, D] or
// [C, num_layers, num_pages, page_size, D], contiguous in the last dim (C = 2 for K/V, 1 for MLA).
// A plain byte copy (no arithmetic), so any 2- or 4-byte dtype works. Launched on the current stream,
// no host synchronisation, no allocation: a decode step with it can be CUDA-graph captured.
//
// Only cheap headers on purpose (no torch/extension.h): see csrc/ops.h.
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "ops.h"

namespace treeattn {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct Strides {
  int64_t src_n, src_h;  // k / v rows, in elements
  int64_t page, slot, h;  // one pool plane, in elements
};

struct Args {
  const int64_t* slots;
  const void* k;
  const void* v;  // null for MLA
  void* k_pool;   // pool[0, layer]
  void* v_pool;   // pool[1, layer], null for MLA
  int64_t n, page_size, num_slots;  // num_slots = num_pages * page_size of one plane
  int planes, H, D;
  Strides sk, sv;
};

// blockDim.y rows per block, blockDim.x threads per row; each thread moves VEC elements per step.
// Row (i, plane) copies k (plane 0) or v (plane 1) of token i: H heads of D elements each.
// T is an unsigned integer type of the element's size: a byte copy, no arithmetic.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) kv_write_kernel(Args a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.n * a.planes) return;
  const int64_t i = row / a.planes;
  const bool is_v = row - i * a.planes == 1;
  const int64_t slot = a.slots[i];
  if (slot < 0 || slot >= a.num_slots) return;
  const Strides& s = is_v ? a.sv : a.sk;
  const T* src = static_cast<const T*>(is_v ? a.v : a.k) + i * s.src_n;
  const int64_t page = slot / a.page_size, off = slot - page * a.page_size;
  T* dst = static_cast<T*>(is_v ? a.v_pool : a.k_pool) + page * s.page + off * s.slot;
  const int steps = a.D / VEC;  // vector steps per head
  for (int e = threadIdx.x; e < a.H * steps; e += blockDim.x) {
    const int h = e / steps, d = (e - h * steps) * VEC;
    *reinterpret_cast<Vec<T, VEC>*>(dst + h * s.h + d) = *reinterpret_cast<const Vec<T, VEC>*>(src + h * s.src_h + d);
  }
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <typename T, int VEC>
void launch(const Args& a, cudaStream_t stream) {
  const int tx = static_cast<int>(std::min<int64_t>(next_pow2(std::max<int64_t>(int64_t(a.H) * (a.D / VEC), 1)), 128));
  const int ty = kThreads / tx;
  const int64_t blocks = (a.n * a.planes + ty - 1) / ty;
  TORCH_CHECK(blocks <= 0x7fffffff, "kv_write_cuda: too many tokens (", a.n, ")");
  kv_write_kernel<T, VEC><<<static_cast<unsigned>(blocks), dim3(tx, ty), 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned(const void* p, std::initializer_list<int64_t> strides, int64_t es, int64_t bytes) {
  if (p == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  for (int64_t st : strides)
    if ((st * es) % bytes != 0) return false;
  return true;
}

// 16-byte moves when every row, head and slot start allows them, else one element at a time.
template <typename T>
void dispatch_vec(const Args& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int64_t es = sizeof(T), bytes = 16;
  const bool vec = a.D % VEC == 0 && aligned(a.k, {a.sk.src_n, a.sk.src_h}, es, bytes) &&
                   aligned(a.k_pool, {a.sk.page, a.sk.slot, a.sk.h}, es, bytes) &&
                   aligned(a.v, {a.sv.src_n, a.sv.src_h}, es, bytes) &&
                   aligned(a.v_pool, {a.sv.page, a.sv.slot, a.sv.h}, es, bytes);
  if (vec) {
    launch<T, VEC>(a, stream);
  } else {
    launch<T, 1>(a, stream);
  }
}

void check_rows(const at::TensorBase& t, const char* name, const at::TensorBase& slots, const at::TensorBase& pool) {
  const int64_t row_dims = pool.dim() - 4;  // (H, D) for GQA, (D) for MLA
  TORCH_CHECK(t.dim() == row_dims + 1, "kv_write_cuda: ", name, " must have ", row_dims + 1,
              " dims ([n, ...] rows of the pool), got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == slots.size(0), "kv_write_cuda: ", name, " must have ", slots.size(0),
              " rows (len(slots)), got shape ", t.sizes());
  for (int64_t d = 1; d < t.dim(); ++d)
    TORCH_CHECK(t.size(d) == pool.size(d + 3), "kv_write_cuda: ", name, " must have shape [n, ",
                pool.sizes().slice(4), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == pool.scalar_type(), "kv_write_cuda: ", name, " must have dtype ",
              pool.scalar_type(), " (the pool's), got ", t.scalar_type());
  TORCH_CHECK(t.device() == pool.device(), "kv_write_cuda: ", name, " must be on ", pool.device(),
              " (the pool's device), got ", t.device());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "kv_write_cuda: ", name,
              " must be contiguous in the last dim, got strides ", t.strides());
}

}  // namespace

void kv_write_cuda(const at::TensorBase& slots, const at::TensorBase& k, const at::TensorBase* v,
                   const at::TensorBase& pool, int64_t layer) {
  TORCH_CHECK(pool.is_cuda(), "kv_write_cuda: pool must be a CUDA tensor, got device ", pool.device());
  TORCH_CHECK(pool.dim() == 5 || pool.dim() == 6,
              "kv_write_cuda: pool must be [C, num_layers, num_pages, page_size, (H,) D], got shape ", pool.sizes());
  const int planes = v ? 2 : 1;
  TORCH_CHECK(pool.size(0) == planes, "kv_write_cuda: pool must have ", planes, " planes in dim 0 (",
              v ? "K and V" : "MLA: one latent row", "), got shape ", pool.sizes());
  TORCH_CHECK(layer >= 0 && layer < pool.size(1), "kv_write_cuda: layer must be in [0, ", pool.size(1), "), got ",
              layer);
  TORCH_CHECK(pool.size(-1) <= 1 || pool.stride(-1) == 1, "kv_write_cuda: pool must be contiguous in the last dim");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::ScalarType::Long && slots.device() == pool.device(),
              "kv_write_cuda: slots must be a 1-D int64 tensor on ", pool.device(), ", got ", slots.scalar_type(),
              " of shape ", slots.sizes(), " on ", slots.device());
  TORCH_CHECK(slots.numel() <= 1 || slots.stride(0) == 1, "kv_write_cuda: slots must be contiguous");
  check_rows(k, "k", slots, pool);
  if (v) check_rows(*v, "v", slots, pool);
  if (slots.numel() == 0) return;

  const bool gqa = pool.dim() == 6;
  const int64_t es = pool.element_size();
  char* base = static_cast<char*>(pool.data_ptr());
  const auto plane = [&](int64_t c) { return base + (c * pool.stride(0) + layer * pool.stride(1)) * es; };
  const Strides pool_strides{0, 0, pool.stride(2), pool.stride(3), gqa ? pool.stride(4) : 0};
  const auto strides = [&](const at::TensorBase& t) {
    Strides s = pool_strides;
    s.src_n = t.stride(0);
    s.src_h = t.dim() == 3 ? t.stride(1) : 0;
    return s;
  };
  const int64_t H = gqa ? pool.size(4) : 1, D = pool.size(-1);
  TORCH_CHECK(H * D <= 0x3fffffff, "kv_write_cuda: rows too wide (", H, " x ", D, ")");
  Args a{slots.const_data_ptr<int64_t>(), k.const_data_ptr(), v ? v->const_data_ptr() : nullptr, plane(0),
         v ? plane(1) : nullptr, slots.size(0), pool.size(3), pool.size(2) * pool.size(3), planes,
         static_cast<int>(H), static_cast<int>(D), strides(k), v ? strides(*v) : strides(k)};

  const c10::cuda::CUDAGuard guard(pool.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pool.device().index()).stream();
  switch (es) {
    case 2:
      return dispatch_vec<uint16_t>(a, stream);
    case 4:
      return dispatch_vec<uint32_t>(a, stream);
    case 8:
      return dispatch_vec<uint64_t>(a, stream);
    default:
      TORCH_CHECK(false, "kv_write_cuda: pool elements must be 2, 4 or 8 bytes, got ", pool.scalar_type());
  }
}

}  // namespace treeattn
