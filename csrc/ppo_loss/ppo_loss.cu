// PPO's clipped surrogate + clipped value loss on the GPU, to the CPU kernel's contract (ppo_loss.h):
// the forward writes the loss and the eight statistics and, when asked, the gradients for a unit
// upstream gradient, in one kernel; the backward is one kernel that scales them by grad_loss, read on
// the device (no sync). The loss kernel is a single block of 1024 threads striding over the N = B * T
// tokens and reducing in a fixed order (thread partials in double, then a fixed tree), so results
// are the same run after run: at RLHF sizes (N ~ 32k) one block beats a multi-block reduction that
// would need a second launch or atomics. Same per-token math as ppo_loss.cpp (ties and clamp edges
// follow autograd's rules for the reference).
#include "ppo_loss/ppo_loss.h"
#include "common/cuda_utils.cuh"

namespace fr::cuda {
namespace {

constexpr int kThreads = 1024;
enum Slot : int { kSumPg = 0, kSumVl, kSumClip, kSumVclip, kSumK3, kSumRatio, kSumEnt, kSumMask, kNumSums };

template <class A>
struct Token {
  A log_ratio, ratio, pg1, pg2;  // -A r, -A clamp(r, 1 - c, 1 + c)
  bool v_in;                     // |v - v_old| <= c_v
  A v_err, vc_err;               // v - R, v_c - R
};

template <class A>
__device__ __forceinline__ Token<A> token(A lp, A olp, A adv, A v, A ov, A ret, A lo, A hi, A cv) {
  Token<A> t;
  t.log_ratio = lp - olp;
  t.ratio = exp(t.log_ratio);
  t.pg1 = -adv * t.ratio;
  t.pg2 = -adv * min(max(t.ratio, lo), hi);
  const A v_delta = v - ov;
  t.v_in = v_delta >= -cv && v_delta <= cv;
  t.v_err = v - ret;
  // v_c is v itself inside the clip range (as the CPU kernel): no spurious rounding ties.
  t.vc_err = t.v_in ? t.v_err : ov + min(max(v_delta, -cv), cv) - ret;
  return t;
}

template <class M>
__device__ __forceinline__ float mask_val(const M* m, int64_t i) {
  if constexpr (sizeof(M) == 1) return float(m[i]);
  else return float(load(m + i));
}
__device__ __forceinline__ double mask_val(const double* m, int64_t i) { return m[i]; }

struct Args {
  const void *lp, *olp, *adv, *v, *ov, *ret, *ent, *mask;
  int64_t N;
  double clip, clip_v, vf_coef, ent_coef;
};

// Per-token gradients of a unit upstream gradient: d loss / d logprobs, d values (and d entropy).
template <class A>
struct TokenGrads {
  A lp, v;
};
template <class A>
__device__ __forceinline__ TokenGrads<A> token_grads(const Token<A>& t, A m, double g_over_n, const Args& a,
                                                     A lo, A hi) {
  const A half = A(0.5);
  const A w_pg = A(m * g_over_n), w_v = A(m * g_over_n * a.vf_coef);
  // torch.maximum sends half the gradient to each side of a tie; clamp passes it on [lo, hi]
  const A tie = t.pg1 == t.pg2 ? half : A(0);
  const A in_r = t.ratio >= lo && t.ratio <= hi ? A(1) : A(0);
  const A g_lp = w_pg * t.pg1 * (A(t.pg1 > t.pg2) + tie + (A(t.pg2 > t.pg1) + tie) * in_r);
  const A vl1 = t.v_err * t.v_err, vl2 = t.vc_err * t.vc_err, vtie = vl1 == vl2 ? half : A(0);
  // 0.5 d(x^2) = x: the 0.5 of v_loss cancels the 2
  const A g_v = w_v * ((A(vl1 > vl2) + vtie) * t.v_err + (A(vl2 > vl1) + vtie) * t.vc_err * A(t.v_in));
  return {g_lp, g_v};
}

// The loss, its statistics and (kGrads) the per-token gradients in one launch of one block. The
// gradients need n = sum(mask) before the first token, so kGrads adds a pass over the mask first
// (N bytes); the sums are then the same as without it, bit for bit.
template <class T, class M, bool kGrads>
__global__ void __launch_bounds__(kThreads) ppo_kernel(Args a, T* loss, acc_t<T>* stats, acc_t<T>* d_lp,
                                                       acc_t<T>* d_v, acc_t<T>* d_ent) {
  using A = acc_t<T>;
  __shared__ double scratch[32];
  const T *lp = static_cast<const T*>(a.lp), *olp = static_cast<const T*>(a.olp),
          *adv = static_cast<const T*>(a.adv), *v = static_cast<const T*>(a.v),
          *ov = static_cast<const T*>(a.ov), *ret = static_cast<const T*>(a.ret),
          *ent = static_cast<const T*>(a.ent);
  const M* mask = static_cast<const M*>(a.mask);
  const A lo = A(1.0 - a.clip), hi = A(1.0 + a.clip), cv = A(a.clip_v);
  double g_over_n = 0;
  if constexpr (kGrads) {
    double msum = 0;
    for (int64_t i = threadIdx.x; i < a.N; i += kThreads) msum += double(mask_val(mask, i));
    g_over_n = 1.0 / max(block_reduce(msum, 0.0, Sum(), scratch), 1.0);
  }
  double s[kNumSums] = {};
  double rmax = -INFINITY;
  for (int64_t i = threadIdx.x; i < a.N; i += kThreads) {
    const A m = A(mask_val(mask, i));
    const Token<A> t = token<A>(load(lp + i), load(olp + i), load(adv + i), load(v + i), load(ov + i),
                                load(ret + i), lo, hi, cv);
    const A vl1 = t.v_err * t.v_err, vl2 = t.vc_err * t.vc_err;
    s[kSumPg] += double(m * max(t.pg1, t.pg2));
    s[kSumVl] += double(m * max(vl1, vl2));
    s[kSumClip] += t.pg2 > t.pg1 ? double(m) : 0.0;
    s[kSumVclip] += vl2 > vl1 ? double(m) : 0.0;
    s[kSumK3] += double(m * ((t.ratio - A(1)) - t.log_ratio));  // k3, http://joschu.net/blog/kl-approx.html
    s[kSumRatio] += double(m * t.ratio);
    if (ent) s[kSumEnt] += double(m * load(ent + i));
    s[kSumMask] += double(m);
    if (m != A(0)) rmax = max(rmax, double(t.ratio));
    if constexpr (kGrads) {
      const TokenGrads<A> g = token_grads(t, m, g_over_n, a, lo, hi);
      d_lp[i] = g.lp;
      d_v[i] = g.v;
      if (d_ent) d_ent[i] = A(-m * g_over_n * a.ent_coef);
    }
  }
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) s[k] = block_reduce(s[k], 0.0, Sum(), scratch);
  rmax = block_reduce(rmax, double(-INFINITY), Max(), scratch);
  if (threadIdx.x != 0) return;
  const double n = max(s[kSumMask], 1.0);
  double st[kNumPpoStats];
  st[kPgLoss] = s[kSumPg] / n;
  st[kVLoss] = 0.5 * s[kSumVl] / n;
  st[kClipfrac] = s[kSumClip] / n;
  st[kVfClipfrac] = s[kSumVclip] / n;
  st[kApproxKl] = s[kSumK3] / n;
  st[kRatioMean] = s[kSumRatio] / n;
  st[kRatioMax] = rmax == -INFINITY ? 0.0 : rmax;  // no live token: 0, as the reference
  st[kEntropy] = s[kSumEnt] / n;
  for (int k = 0; k < kNumPpoStats; ++k) stats[k] = A(st[k]);
  store(loss, A(st[kPgLoss] + a.vf_coef * st[kVLoss] - a.ent_coef * st[kEntropy]));
}

// out (n,) = grads (n,) * grad_loss (one value of out's dtype T, on the device), rounded to T.
template <class T>
__global__ void ppo_scale_kernel(const acc_t<T>* grads, const T* grad_loss, T* out, int64_t n) {
  using A = acc_t<T>;
  const A g = A(load(grad_loss));
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(out + i, A(grads[i] * g));
}

Args args_of(const PpoLossInputs& in) {
  return {in.logprobs, in.old_logprobs, in.advantages, in.values, in.old_values, in.returns, in.entropy,
          in.mask, in.N, in.clip_range, in.clip_range_value, in.vf_coef, in.ent_coef};
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

// Dispatches scalar_t over the float dtypes and mask_t over {bool mask, weights of dtype scalar_t}.
#define FR_PPO_CUDA_DISPATCH(in, ...)                                                       \
  FR_DISPATCH_FLOAT((in).dtype, if ((in).mask_is_bool) {                                    \
    using mask_t = uint8_t;                                                                 \
    __VA_ARGS__;                                                                            \
  } else {                                                                                  \
    using mask_t = scalar_t;                                                                \
    __VA_ARGS__;                                                                            \
  })

void ppo_loss_cuda(const PpoLossParams& p, cudaStream_t stream) {
  FR_PPO_CUDA_DISPATCH(p.in, {
    using A = acc_t<scalar_t>;
    auto* loss = static_cast<scalar_t*>(p.loss);
    auto* stats = static_cast<A*>(p.stats);
    if (p.grads != nullptr && p.in.N > 0) {
      A* rows = static_cast<A*>(p.grads);  // (K, N): d/d logprobs, d/d values[, d/d entropy]
      cuda::ppo_kernel<scalar_t, mask_t, true><<<1, cuda::kThreads, 0, stream>>>(
          cuda::args_of(p.in), loss, stats, rows, rows + p.in.N, p.in.entropy ? rows + 2 * p.in.N : nullptr);
    } else {
      cuda::ppo_kernel<scalar_t, mask_t, false><<<1, cuda::kThreads, 0, stream>>>(
          cuda::args_of(p.in), loss, stats, nullptr, nullptr, nullptr);
    }
  });
  cuda::check_launch("ppo_loss");
}

void ppo_loss_scale_cuda(const PpoLossScaleParams& p, const void* grad_loss, cudaStream_t stream) {
  if (p.n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((p.n + threads - 1) / threads, 1024));
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::ppo_scale_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        static_cast<const acc_t<scalar_t>*>(p.grads), static_cast<const scalar_t*>(grad_loss),
        static_cast<scalar_t*>(p.out), p.n);
  });
  cuda::check_launch("ppo_loss_scale");
}

}  // namespace fr
