// The critic-free policy loss on the GPU, to the CPU kernel's contract (policy_loss.h): one kernel
// writes the loss, the eight statistics and, when asked, the per-token gradients for a unit upstream
// gradient; the backward is ppo_loss's scale kernel. One block of 1024 threads, as ppo_loss (one block
// beats a multi-block reduction at RLHF sizes, N ~ 32k): each warp takes whole rows, so a row's mask
// sum (its weight w_b under the sequence aggregations) is one warp reduction. A first pass sums the
// mask (n, and S = rows with tokens), the second does the math; every sum is a thread partial in double
// reduced in a fixed order, so results are the same run after run. Same per-token math as
// policy_loss.cpp (ties and clamp edges follow autograd's rules for the reference).
#include "policy_loss/policy_loss.h"
#include "common/cuda_utils.cuh"

namespace fr::cuda {
namespace {

constexpr int kThreads = 1024, kWarps = kThreads / 32;
enum Slot : int { kSumPg = 0, kSumKl, kSumLow, kSumHigh, kSumK3, kSumRatio, kSumEnt, kSumLoss, kNumSums };

template <class M>
__device__ __forceinline__ float mask_val(const M* m, int64_t i) {
  if constexpr (sizeof(M) == 1) return float(m[i]);
  else return float(load(m + i));
}
__device__ __forceinline__ double mask_val(const double* m, int64_t i) { return m[i]; }

// The mask's sum over row b (T tokens), the same in every lane (xor-shuffle tree: a fixed order).
template <class M>
__device__ __forceinline__ double row_mask_sum(const M* mask, int64_t b, int64_t T, int lane) {
  double s = 0;
  for (int64_t t = lane; t < T; t += 32) s += double(mask_val(mask, b * T + t));
  return warp_sum(s);
}

struct Args {
  const void *lp, *olp, *adv, *ref, *ent, *mask;
  bool adv_per_seq;
  int64_t B, T;
  PolicyAgg agg;
  double eps_low, eps_high, beta, max_len, ent_coef;
};

template <class T, class M, bool kGrads>
__global__ void __launch_bounds__(kThreads) policy_kernel(Args a, T* loss, acc_t<T>* stats, acc_t<T>* d_lp,
                                                          acc_t<T>* d_ent) {
  using A = acc_t<T>;
  __shared__ double scratch[32];
  const T *lp = static_cast<const T*>(a.lp), *olp = static_cast<const T*>(a.olp),
          *adv = static_cast<const T*>(a.adv), *ref = static_cast<const T*>(a.ref),
          *ent = static_cast<const T*>(a.ent);
  const M* mask = static_cast<const M*>(a.mask);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const A lo = A(1.0 - a.eps_low), hi = A(1.0 + a.eps_high), half = A(0.5), one = A(1), beta = A(a.beta);

  // pass 1: n = max(sum m, 1) and S = max(rows with sum m > 0, 1) (rows with no token count for nothing)
  double msum = 0, live = 0;
  for (int64_t b = warp; b < a.B; b += kWarps) {
    const double c = row_mask_sum(mask, b, a.T, lane);
    if (lane == 0) msum += c, live += c > 0 ? 1.0 : 0.0;
  }
  const double n = max(block_reduce(msum, 0.0, Sum(), scratch), 1.0);
  const double S = max(block_reduce(live, 0.0, Sum(), scratch), 1.0);

  // pass 2: the per-token math, row by row
  double s[kNumSums] = {};
  double rmax = -INFINITY;
  for (int64_t b = warp; b < a.B; b += kWarps) {
    const double c = row_mask_sum(mask, b, a.T, lane);
    const double w = a.agg == PolicyAgg::kTokenMean           ? 1.0 / n
                     : a.agg == PolicyAgg::kSeqMeanTokenMean ? 1.0 / (max(c, 1.0) * S)
                                                             : 1.0 / (a.max_len * S);
    for (int64_t t = lane; t < a.T; t += 32) {
      const int64_t i = b * a.T + t;
      const A m = A(mask_val(mask, i)), lpi = load(lp + i);
      const A advi = a.adv_per_seq ? A(load(adv + b)) : A(load(adv + i));
      const A log_ratio = lpi - A(load(olp + i)), ratio = exp(log_ratio);
      const A pg1 = -advi * ratio;
      const A pg2 = -advi * (ratio < lo ? lo : ratio > hi ? hi : ratio);
      const A pg = pg2 > pg1 ? pg2 : pg1;  // a NaN in pg1 stays NaN, as torch.minimum
      A l = pg;
      s[kSumPg] += double(m * pg);
      s[kSumLow] += ratio < lo && advi < A(0) ? double(m) : 0.0;  // the clip is active only for A's sign
      s[kSumHigh] += ratio > hi && advi > A(0) ? double(m) : 0.0;
      s[kSumK3] += double(m * ((ratio - one) - log_ratio));  // k3 between new and old (joschu.net/blog/kl-approx.html)
      s[kSumRatio] += double(m * ratio);
      A ed_m1 = 0;  // e^d - 1, d = ref - logp
      if (ref) {
        const A d = A(load(ref + i)) - lpi;
        ed_m1 = exp(d) - one;
        const A kl = ed_m1 - d;  // k3 to the reference
        s[kSumKl] += double(m * kl);
        if (a.beta > 0) l += beta * kl;
      }
      if (ent) {
        const A h = load(ent + i);
        s[kSumEnt] += double(m * h);
        if (a.ent_coef > 0) l -= A(a.ent_coef) * h;
      }
      s[kSumLoss] += w * double(m * l);
      if (m != A(0)) rmax = max(rmax, double(ratio));
      if constexpr (kGrads) {
        // torch.minimum sends half the gradient to each side of a tie; clamp passes it on [lo, hi]
        const A tie = pg1 == pg2 ? half : A(0), in_r = ratio >= lo && ratio <= hi ? one : A(0);
        A d_l = pg1 * (A(pg1 > pg2) + tie + (A(pg2 > pg1) + tie) * in_r);
        if (a.beta > 0) d_l -= beta * ed_m1;  // d k3 / d logp = 1 - e^d
        const A wm = A(w) * m;
        d_lp[i] = wm * d_l;
        if (d_ent) d_ent[i] = A(-a.ent_coef) * wm;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) s[k] = block_reduce(s[k], 0.0, Sum(), scratch);
  rmax = block_reduce(rmax, double(-INFINITY), Max(), scratch);
  if (threadIdx.x != 0) return;
  double st[kNumPolicyStats];
  st[kPlPgLoss] = s[kSumPg] / n;
  st[kPlKl] = s[kSumKl] / n;
  st[kPlClipfracLow] = s[kSumLow] / n;
  st[kPlClipfracHigh] = s[kSumHigh] / n;
  st[kPlApproxKl] = s[kSumK3] / n;
  st[kPlRatioMean] = s[kSumRatio] / n;
  st[kPlRatioMax] = rmax == -INFINITY ? 0.0 : rmax;  // no live token: 0, as the reference
  st[kPlEntropy] = s[kSumEnt] / n;
  for (int k = 0; k < kNumPolicyStats; ++k) stats[k] = A(st[k]);
  store(loss, A(s[kSumLoss]));
}

Args args_of(const PolicyLossInputs& in) {
  return {in.logprobs, in.old_logprobs, in.advantages, in.ref_logprobs, in.entropy, in.mask, in.adv_per_seq,
          in.B,        in.T,            in.agg,        in.eps_low,      in.eps_high, in.beta, in.max_len,
          in.ent_coef};
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

void policy_loss_cuda(const PolicyLossParams& p, cudaStream_t stream) {
  // scalar_t over the float dtypes, mask_t over {bool mask, weights of dtype scalar_t}
  FR_DISPATCH_FLOAT(p.in.dtype, {
    using A = acc_t<scalar_t>;
    auto* loss = static_cast<scalar_t*>(p.loss);
    auto* stats = static_cast<A*>(p.stats);
    A* rows = static_cast<A*>(p.grads);  // (K, B, T): d/d logprobs[, d/d entropy]
    const bool grads = rows != nullptr && p.in.B * p.in.T > 0;
    A* d_ent = grads && p.in.entropy ? rows + p.in.B * p.in.T : nullptr;
    auto launch = [&](auto mask_tag) {
      using mask_t = decltype(mask_tag);
      if (grads)
        cuda::policy_kernel<scalar_t, mask_t, true>
            <<<1, cuda::kThreads, 0, stream>>>(cuda::args_of(p.in), loss, stats, rows, d_ent);
      else
        cuda::policy_kernel<scalar_t, mask_t, false>
            <<<1, cuda::kThreads, 0, stream>>>(cuda::args_of(p.in), loss, stats, nullptr, nullptr);
    };
    if (p.in.mask_is_bool) launch(uint8_t{});
    else launch(scalar_t{});
  });
  cuda::check_launch("policy_loss");
}

}  // namespace fr
