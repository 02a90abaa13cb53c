// Exact merge of two attention states.
//
//   lse = logaddexp(lse_a, lse_b)
//   o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)        (fp32 arithmetic)
//
// o_a, o_b: [n, H, D] fp32/fp16/bf16 (same dtype); o_out: [n, H, D], any of the three dtypes;
// lse_a, lse_b, lse_out: [n, H] fp32, natural log. The o tensors need a contiguous last dim; the
// first two dims (and both lse dims) may have any strides. A state whose lse is -inf contributes
// nothing and its o is never read (so garbage or NaN there is harmless); if both are -inf the
// result is o = 0, lse = -inf. o_out may alias o_a or o_b, and lse_out may alias lse_a or lse_b
// (in-place merge). Launched on the current stream, no host synchronisation, no allocation.
//
// Only cheap headers on purpose (no torch/extension.h): see csrc/ops.h.
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "ops.h"

namespace treeattn {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T, moved as one aligned vector load/store (two 16-byte ones for 32 bytes).
__host__ __device__ constexpr int vec_align(int bytes) { return bytes < 16 ? bytes : 16; }
template <typename T, int N>
struct alignas(vec_align(sizeof(T) * N)) Vec {
  T v[N];
};

constexpr int kThreads = 256;

// A block of kThreads threads handles blockDim.y rows with blockDim.x threads per row; a row is
// one (i, h) pair, and each thread handles VEC consecutive elements of it per step.
// Requires: D % VEC == 0, and (for VEC > 1) every row start aligned for Vec<T, VEC>.
template <typename TIn, typename TOut, int VEC>
__global__ void __launch_bounds__(kThreads)
    merge_state_kernel(const TIn* o_a, const float* lse_a, const TIn* o_b, const float* lse_b, TOut* o_out,
                       float* lse_out, int64_t rows, int64_t H, int D,
                       // strides, in elements: o tensors (dim 0, dim 1), lse tensors (dim 0, dim 1)
                       int64_t sa0, int64_t sa1, int64_t sb0, int64_t sb1, int64_t so0,
                       int64_t so1, int64_t la0, int64_t la1, int64_t lb0, int64_t lb1,
                       int64_t lo0, int64_t lo1) {
  // Per-row weights. Every lse read of this block's rows happens before the barrier and the
  // lse_out write after it, so lse_out may alias lse_a / lse_b (rows belong to one block).
  __shared__ float s_wa[kThreads];
  __shared__ float s_wb[kThreads];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t i = valid ? row / H : 0;
  const int64_t h = valid ? row - i * H : 0;

  float lse = -INFINITY;
  if (valid && threadIdx.x == 0) {
    const float a = lse_a[i * la0 + h * la1];
    const float b = lse_b[i * lb0 + h * lb1];
    const float m = fmaxf(a, b);
    float wa = 0.f, wb = 0.f;
    if (isnan(a) || isnan(b)) {
      lse = wa = wb = NAN;  // keep a bad input visible (fmaxf would drop a NaN operand)
    } else if (m == -INFINITY) {
      lse = -INFINITY;  // both states empty: o = 0 (weights stay 0)
    } else {
      lse = m + log1pf(expf(fminf(a, b) - m));  // logaddexp; exp(-inf) = 0 for one empty state
      wa = expf(a - lse);
      wb = expf(b - lse);
    }
    s_wa[threadIdx.y] = wa;
    s_wb[threadIdx.y] = wb;
  }
  __syncthreads();
  if (!valid) return;
  const float wa = s_wa[threadIdx.y];
  const float wb = s_wb[threadIdx.y];

  const TIn* pa = o_a + i * sa0 + h * sa1;
  const TIn* pb = o_b + i * sb0 + h * sb1;
  TOut* po = o_out + i * so0 + h * so1;
  // An int (not int64) offset: with int64 here nvcc 13 splits the vector stores into scalars.
  for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    // A zero weight means "no contribution": skip the read, so o of an empty state is never used.
    if (wa != 0.f) {
      const Vec<TIn, VEC> va = *reinterpret_cast<const Vec<TIn, VEC>*>(pa + d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = to_float(va.v[k]) * wa;
    }
    if (wb != 0.f) {
      const Vec<TIn, VEC> vb = *reinterpret_cast<const Vec<TIn, VEC>*>(pb + d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = fmaf(to_float(vb.v[k]), wb, acc[k]);
    }
    Vec<TOut, VEC> vo;
#pragma unroll
    for (int k = 0; k < VEC; ++k) vo.v[k] = from_float<TOut>(acc[k]);
    *reinterpret_cast<Vec<TOut, VEC>*>(po + d) = vo;
  }
  if (threadIdx.x == 0) lse_out[i * lo0 + h * lo1] = lse;
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

bool aligned_for(const at::TensorBase& t, int64_t bytes) {
  const auto es = static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0 && (t.stride(0) * es) % bytes == 0 &&
         (t.stride(1) * es) % bytes == 0;
}

template <typename TIn, typename TOut, int VEC>
void launch(const at::TensorBase& o_a, const at::TensorBase& lse_a, const at::TensorBase& o_b,
            const at::TensorBase& lse_b, const at::TensorBase& o_out,
            const at::TensorBase& lse_out, cudaStream_t stream) {
  const int64_t n = o_a.size(0), H = o_a.size(1), D = o_a.size(2);
  const int64_t rows = n * H;
  const int64_t steps = D / VEC;  // vector steps per row
  const int tx = static_cast<int>(std::min<int64_t>(next_pow2(std::max<int64_t>(steps, 1)), 32));
  const int ty = kThreads / tx;
  const int64_t blocks = (rows + ty - 1) / ty;
  TORCH_CHECK(blocks <= 0x7fffffff, "merge_state_cuda: too many rows (", rows, ")");
  TORCH_CHECK(D <= 0x3fffffff, "merge_state_cuda: head dim too large (", D, ")");
  merge_state_kernel<TIn, TOut, VEC><<<static_cast<unsigned>(blocks), dim3(tx, ty), 0, stream>>>(
      static_cast<const TIn*>(o_a.const_data_ptr()), lse_a.const_data_ptr<float>(),
      static_cast<const TIn*>(o_b.const_data_ptr()), lse_b.const_data_ptr<float>(),
      static_cast<TOut*>(o_out.data_ptr()), lse_out.data_ptr<float>(), rows, H, static_cast<int>(D),
      o_a.stride(0), o_a.stride(1), o_b.stride(0), o_b.stride(1), o_out.stride(0),
      o_out.stride(1), lse_a.stride(0), lse_a.stride(1), lse_b.stride(0), lse_b.stride(1),
      lse_out.stride(0), lse_out.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TIn, typename TOut>
void dispatch_vec(const at::TensorBase& o_a, const at::TensorBase& lse_a,
                  const at::TensorBase& o_b, const at::TensorBase& lse_b,
                  const at::TensorBase& o_out, const at::TensorBase& lse_out,
                  cudaStream_t stream) {
  // 16-byte loads of the inputs when every row start allows it (and the matching, possibly
  // narrower or wider, stores of o_out); otherwise one element at a time.
  constexpr int VEC = 16 / sizeof(TIn);
  const int64_t D = o_a.size(2);
  if (D % VEC == 0 && aligned_for(o_a, sizeof(TIn) * VEC) && aligned_for(o_b, sizeof(TIn) * VEC) &&
      aligned_for(o_out, vec_align(sizeof(TOut) * VEC))) {
    launch<TIn, TOut, VEC>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
  } else {
    launch<TIn, TOut, 1>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
  }
}

template <typename TIn>
void dispatch_out(const at::TensorBase& o_a, const at::TensorBase& lse_a,
                  const at::TensorBase& o_b, const at::TensorBase& lse_b,
                  const at::TensorBase& o_out, const at::TensorBase& lse_out,
                  cudaStream_t stream) {
  switch (o_out.scalar_type()) {
    case at::ScalarType::Float:
      return dispatch_vec<TIn, float>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
    case at::ScalarType::Half:
      return dispatch_vec<TIn, __half>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
    case at::ScalarType::BFloat16:
      return dispatch_vec<TIn, __nv_bfloat16>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
    default:
      TORCH_CHECK(false, "merge_state_cuda: o_out must be float32, float16 or bfloat16, got ",
                  o_out.scalar_type());
  }
}

void check_o(const at::TensorBase& t, const char* name, const at::TensorBase& ref) {
  TORCH_CHECK(t.dim() == 3, "merge_state_cuda: ", name, " must be [n, H, D] (3-D), got ",
              t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK(t.sizes() == ref.sizes(), "merge_state_cuda: ", name, " must have shape ",
              ref.sizes(), " (the shape of o_a), got ", t.sizes());
  TORCH_CHECK(t.is_cuda(), "merge_state_cuda: ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), "merge_state_cuda: ", name, " must be on ", ref.device(),
              " (the device of o_a), got ", t.device());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "merge_state_cuda: ", name,
              " must be contiguous in the last dim (stride 1), got strides ", t.strides());
}

void check_lse(const at::TensorBase& t, const char* name, const at::TensorBase& o_a) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == o_a.size(0) && t.size(1) == o_a.size(1),
              "merge_state_cuda: ", name, " must have shape [", o_a.size(0), ", ", o_a.size(1),
              "] ([n, H] of o_a), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::ScalarType::Float, "merge_state_cuda: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == o_a.device(), "merge_state_cuda: ", name, " must be on ",
              o_a.device(), " (the device of o_a), got ", t.device());
}

}  // namespace

void merge_state_cuda(const at::TensorBase& o_a, const at::TensorBase& lse_a,
                      const at::TensorBase& o_b, const at::TensorBase& lse_b,
                      const at::TensorBase& o_out, const at::TensorBase& lse_out) {
  check_o(o_a, "o_a", o_a);
  check_o(o_b, "o_b", o_a);
  check_o(o_out, "o_out", o_a);
  TORCH_CHECK(o_b.scalar_type() == o_a.scalar_type(), "merge_state_cuda: o_b must have dtype ",
              o_a.scalar_type(), " (the dtype of o_a), got ", o_b.scalar_type());
  check_lse(lse_a, "lse_a", o_a);
  check_lse(lse_b, "lse_b", o_a);
  check_lse(lse_out, "lse_out", o_a);
  if (lse_a.numel() == 0) return;  // n * H == 0: nothing to do

  const c10::cuda::CUDAGuard guard(o_a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(o_a.device().index()).stream();
  switch (o_a.scalar_type()) {
    case at::ScalarType::Float:
      return dispatch_out<float>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
    case at::ScalarType::Half:
      return dispatch_out<__half>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
    case at::ScalarType::BFloat16:
      return dispatch_out<__nv_bfloat16>(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream);
    default:
      TORCH_CHECK(false, "merge_state_cuda: o_a must be float32, float16 or bfloat16, got ",
                  o_a.scalar_type());
  }
}

}  // namespace treeattn
