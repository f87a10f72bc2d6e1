// GAE on the GPU: one block per row, one launch. The recursion runs backwards in time, so within a
// row it is sequential: the block stages a chunk of the row in shared memory (coalesced loads),
// thread 0 runs the recursion over it from shared memory, and the block writes the chunk back.
// Adds and multiplies are explicitly rounded (no fused multiply-add), so float64 results equal
// the CPU kernel and the Python loop bit for bit.
#include "common/cuda_ops.h"
#include "common/cuda_utils.cuh"

namespace fr::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 1024;  // time steps staged at once: 2 x 8 KiB in float64

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <class T>
__global__ void __launch_bounds__(kThreads) gae_kernel(const T* __restrict__ rewards,  // (B, T)
                                                       const T* __restrict__ values,   // (B, T)
                                                       const uint8_t* __restrict__ mask,  // (B, T)
                                                       T* __restrict__ adv,            // (B, T) out
                                                       T* __restrict__ ret,            // (B, T) out
                                                       int64_t Tn, double gamma_d, double lam_d) {
  using acc = acc_t<T>;
  __shared__ acc s_r[kChunk], s_v[kChunk];  // rewards, values; then advantages, returns
  __shared__ uint8_t s_m[kChunk];
  __shared__ int64_t s_last[32];
  const int64_t row = blockIdx.x;
  rewards += row * Tn, values += row * Tn, mask += row * Tn, adv += row * Tn, ret += row * Tn;
  const acc gamma = acc(gamma_d), gamma_lam = acc(gamma_d * lam_d);

  // The last response token: V_{t+1} and A_{t+1} are 0 past it, outputs are 0 from it on.
  int64_t last = -1;
  for (int64_t t = threadIdx.x; t < Tn; t += kThreads)
    if (mask[t]) last = t;
  last = block_reduce<int64_t>(last, int64_t(-1), Max(), s_last);
  for (int64_t t = last + 1 + threadIdx.x; t < Tn; t += kThreads) {
    store(adv + t, acc(0));
    store(ret + t, acc(0));
  }

  acc next_value = 0, next_adv = 0;  // carried by thread 0 from chunk to chunk
  for (int64_t end = last + 1; end > 0; end -= kChunk) {
    const int64_t begin = end > kChunk ? end - kChunk : 0;
    const int n = int(end - begin);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      s_r[i] = load(rewards + begin + i);
      s_v[i] = load(values + begin + i);
      s_m[i] = mask[begin + i];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int i = n - 1; i >= 0; --i) {
        const acc vt = s_v[i];
        const acc delta = sub_rn(add_rn(s_r[i], mul_rn(gamma, next_value)), vt);
        next_adv = add_rn(delta, mul_rn(gamma_lam, next_adv));
        next_value = vt;
        s_r[i] = s_m[i] ? next_adv : acc(0);
        s_v[i] = s_m[i] ? add_rn(next_adv, vt) : acc(0);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      store(adv + begin + i, s_r[i]);
      store(ret + begin + i, s_v[i]);
    }
    __syncthreads();  // the next chunk overwrites shared memory
  }
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

void gae_cuda(const GaeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::gae_kernel<scalar_t><<<unsigned(p.B), cuda::kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.rewards), static_cast<const scalar_t*>(p.values), p.mask,
        static_cast<scalar_t*>(p.advantages), static_cast<scalar_t*>(p.returns), p.T, p.gamma, p.lam);
  });
  cuda::check_launch("gae");
}

}  // namespace fr
