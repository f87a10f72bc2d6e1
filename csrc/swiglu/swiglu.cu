// SwiGLU on the GPU, to the CPU kernel's contract (swiglu.h): the same one-exp logistic with g clamped
// at +-L inside (swiglu.cpp), elementwise in a grid-stride loop.
#include "common/cuda_utils.cuh"
#include "swiglu/swiglu.h"

namespace fr::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return ::exp(v); }

template <class acc>
struct Gate {
  acc silu, dsilu;  // silu(g), silu'(g)
};

template <class acc>
__device__ __forceinline__ Gate<acc> gate1(acc g) {
  const acc L = sizeof(acc) == 8 ? acc(1024) : acc(128);  // where exp(-L) is 0
  const acc gc = g < -L ? -L : (g > L ? L : g);  // NaN stays NaN
  const acc a = exp_(-fabs(g));
  const acc q = acc(1) / (acc(1) + a);
  const acc s = g >= 0 ? q : a * q;
  return {(g < -L ? -L : g) * s, s + gc * (a * q * q)};
}

unsigned grid_for(int64_t n) {  // grid-stride beyond 65535 blocks
  const int64_t blocks = ceil_div(n, kThreads);
  return unsigned(blocks < 65535 ? blocks : 65535);
}

template <class T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                       T* __restrict__ y, int64_t n) {  // each (n,)
  using acc = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    store(y + i, gate1<acc>(load(g + i)).silu * acc(load(u + i)));
}

template <class T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                       const T* __restrict__ dy, T* __restrict__ dg,
                                                       T* __restrict__ du, int64_t n) {  // each (n,)
  using acc = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const Gate<acc> t = gate1<acc>(load(g + i));
    const acc d = load(dy + i);
    store(dg + i, d * acc(load(u + i)) * t.dsilu);
    store(du + i, d * t.silu);
  }
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

void swiglu_fwd_cuda(const SwigluFwdParams& p, cudaStream_t stream) {
  if (p.N == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::fwd_kernel<scalar_t><<<cuda::grid_for(p.N), cuda::kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.gate), static_cast<const scalar_t*>(p.up), static_cast<scalar_t*>(p.y), p.N);
  });
  cuda::check_launch("swiglu_fwd");
}

void swiglu_bwd_cuda(const SwigluBwdParams& p, cudaStream_t stream) {
  if (p.N == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::bwd_kernel<scalar_t><<<cuda::grid_for(p.N), cuda::kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.gate), static_cast<const scalar_t*>(p.up), static_cast<const scalar_t*>(p.dy),
        static_cast<scalar_t*>(p.dgate), static_cast<scalar_t*>(p.dup), p.N);
  });
  cuda::check_launch("swiglu_bwd");
}

}  // namespace fr
