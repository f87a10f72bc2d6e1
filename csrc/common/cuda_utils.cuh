// Device-side helpers shared by the CUDA kernels: element loads/stores in the four float dtypes
// (math in acc_t: double for double, float otherwise), warp/block reductions in a fixed order (so
// results do not change from run to run), and the launch-error check of every launcher.
// Plain CUDA C++: no torch header.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace fr::cuda {

// ---- loads and stores: storage type -> acc_t and back -------------------------------------
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const bf16_t* p) { return __uint_as_float(uint32_t(p->bits) << 16); }
__device__ __forceinline__ float load(const f16_t* p) {
  return __half2float(__ushort_as_half(p->bits));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(float* p, double v) { *p = float(v); }
__device__ __forceinline__ void store(bf16_t* p, float v) {  // round to nearest even, as the CPU
  p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ void store(f16_t* p, float v) { p->bits = __half_as_ushort(__float2half_rn(v)); }

// ---- reductions in a fixed order -----------------------------------------------------------
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction of one value per thread with `op`; every thread gets the result.
// `scratch` holds >= 32 T; blockDim.x a multiple of 32 (<= 1024). Ends with a barrier, so
// scratch can be reused right after.
template <class T, class Op>
__device__ T block_reduce(T v, T identity, Op op, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : identity;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct Sum {
  template <class T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <class T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <class T> __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every launcher calls this after its launches: an error names the kernel instead of surfacing
// at some later, unrelated CUDA call.
inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fastrlhf CUDA kernel ") + what + " failed: " + cudaGetErrorString(e));
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastrlhf: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace fr::cuda

// Runs `body` with `scalar_t` bound to the storage type for `dtype` (as FR_DISPATCH_FLOAT), without
// float64: kernels whose CUDA path supports fp32/bf16/fp16 only.
#define FR_DISPATCH_HALF_FLOAT(dtype, ...)                                             \
  switch (dtype) {                                                                      \
    case ::fr::DType::f32: { using scalar_t = float; __VA_ARGS__; break; }              \
    case ::fr::DType::bf16: { using scalar_t = ::fr::bf16_t; __VA_ARGS__; break; }      \
    case ::fr::DType::f16: { using scalar_t = ::fr::f16_t; __VA_ARGS__; break; }        \
    default: throw std::invalid_argument("fastrlhf: this CUDA kernel takes float32, bfloat16 or float16"); \
  }
