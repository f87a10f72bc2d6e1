// GAE on the GPU: one block per row, one launch. The recursion runs backwards in time:
//   delta_t = r_t + gamma V_{t+1} - V_t  (V past the last response token is 0),
//   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.
// The deltas need no recursion, so all threads compute them from a staged chunk of the row; only the
// A chain is sequential, and thread 0 runs it over shared memory 8 steps at a time with the next 8
// deltas already loaded, so each step costs one dependent multiply and add, not a shared-memory
// round trip. Adds and multiplies are explicitly rounded (no fused multiply-add) and happen in the
// reference's order, so float64 results equal the CPU kernel and the Python loop bit for bit.
#include "gae/gae.h"
#include "common/cuda_utils.cuh"

namespace fr::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 1024;  // time steps staged at once: 2 x 8 KiB in float64
constexpr int kGroup = 8;     // chain steps per batch of loads

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// d[0..n) holds deltas; on return it holds A, with `carry` = A past the chunk in and A_0 out.
template <class A>
__device__ void advantage_chain(A* __restrict__ d, int n, A& carry, A gamma_lam) {
  int i = n - 1;
  A next[kGroup];
  if (i >= kGroup - 1) {
#pragma unroll
    for (int u = 0; u < kGroup; ++u) next[u] = d[i - u];
  }
  for (; i >= kGroup - 1; i -= kGroup) {
    A x[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) x[u] = next[u];
    if (i - kGroup >= kGroup - 1) {  // prefetch the next group before the dependent chain
#pragma unroll
      for (int u = 0; u < kGroup; ++u) next[u] = d[i - kGroup - u];
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) x[u] = carry = add_rn(x[u], mul_rn(gamma_lam, carry));
#pragma unroll
    for (int u = 0; u < kGroup; ++u) d[i - u] = x[u];
  }
  for (; i >= 0; --i) d[i] = carry = add_rn(d[i], mul_rn(gamma_lam, carry));
}

template <class T>
__global__ void __launch_bounds__(kThreads) gae_kernel(const T* __restrict__ rewards,  // (B, T)
                                                       const T* __restrict__ values,   // (B, T)
                                                       const uint8_t* __restrict__ mask,  // (B, T)
                                                       T* __restrict__ adv,            // (B, T) out
                                                       T* __restrict__ ret,            // (B, T) out
                                                       int64_t Tn, double gamma_d, double lam_d) {
  using acc = acc_t<T>;
  __shared__ acc s_d[kChunk], s_v[kChunk];  // deltas, then advantages; values
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

  acc next_adv = 0;  // thread 0's A_{t+1}, carried from chunk to chunk
  for (int64_t end = last + 1; end > 0; end -= kChunk) {
    const int64_t begin = end > kChunk ? end - kChunk : 0;
    const int n = int(end - begin);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int64_t t = begin + i;
      const acc vt = load(values + t), v_next = t < last ? acc(load(values + t + 1)) : acc(0);
      s_d[i] = sub_rn(add_rn(acc(load(rewards + t)), mul_rn(gamma, v_next)), vt);
      s_v[i] = vt;
    }
    __syncthreads();
    if (threadIdx.x == 0) advantage_chain(s_d, n, next_adv, gamma_lam);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const bool m = mask[begin + i];
      store(adv + begin + i, m ? s_d[i] : acc(0));
      store(ret + begin + i, m ? add_rn(s_d[i], s_v[i]) : acc(0));
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
