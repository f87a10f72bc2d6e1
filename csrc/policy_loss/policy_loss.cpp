// policy_loss: per token (m = mask weight, r = exp(logp - old_logp), d = ref_logp - logp):
//   pg = max(-A r, -A clamp(r, 1 - eps_low, 1 + eps_high))   (= -min(r A, clip(r) A))
//   l  = pg [+ beta (e^d - d - 1) when beta > 0] [- ent_coef H when ent_coef > 0]
//   loss = sum_b w_b sum_t m_bt l_bt, with the row weights w_b of the aggregation (policy_loss.h)
// Two passes: the row sums of the mask first (they give every w_b), then fixed chunks of whole rows
// in parallel; each writes its tokens' gradients (final, since w_b is known) and its partial sums,
// which are added (doubles) in chunk order, so results do not depend on the thread count. The
// gradients follow autograd's rules for the reference exactly: torch.minimum sends half the gradient
// to each side of a tie, torch.clamp passes it where lo <= r <= hi.
#include "policy_loss/policy_loss.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/simd.h"

namespace fr::FR_ISA_NS {
namespace {

constexpr int64_t kChunkTokens = 1024;  // a chunk holds whole rows, about this many tokens (>= 1 row)
constexpr int64_t kGrainChunks = 64;    // >= 64k tokens per task: a (64, 512) batch stays on one thread
enum Slot : int { kSumPg = 0, kSumKl, kSumLow, kSumHigh, kSumK3, kSumRatio, kSumEnt, kNumSums };
// A chunk's part: the kNumSums masked sums, the loss sum_b w_b sum_t m l, the max live ratio (-inf: none).
constexpr int kPartLoss = kNumSums, kPartMax = kNumSums + 1, kPartSize = kNumSums + 2;

template <class X> const X* at(const void* base, int64_t i) { return static_cast<const X*>(base) + i; }
// Element i as acc_t (a bool mask byte as 0.0 / 1.0).
template <class X> auto val(const void* base, int64_t i) {
  if constexpr (std::is_same_v<X, uint8_t>) return float(*at<X>(base, i));
  else return to_acc(*at<X>(base, i));
}

// sum_t m l of one row, from its masked sums: the KL and entropy terms only where they are on.
double row_loss(const PolicyLossInputs& in, const double* s) {
  double l = s[kSumPg];
  if (in.beta > 0) l += in.beta * s[kSumKl];
  if (in.ent_coef > 0) l -= in.ent_coef * s[kSumEnt];
  return l;
}

// ---- one row b: its masked sums (added to s), its max live ratio (into rmax), its gradients ------
// w: the row's weight; a token's gradient is w m d l / d logp (and -ent_coef w m for the entropy).
template <class T, class M>
void row_scalar(const PolicyLossParams& p, int64_t b, double w, double* s, double& rmax) {
  using acc = acc_t<T>;
  const PolicyLossInputs& in = p.in;
  const acc lo = acc(1.0 - in.eps_low), hi = acc(1.0 + in.eps_high), half = acc(0.5), one = acc(1);
  const int64_t i0 = b * in.T;
  acc* g_lp = p.grads ? static_cast<acc*>(p.grads) + i0 : nullptr;                          // (T,)
  acc* g_ent = p.grads && in.entropy ? static_cast<acc*>(p.grads) + in.B * in.T + i0 : nullptr;  // (T,)
  for (int64_t t = 0; t < in.T; ++t) {
    const int64_t i = i0 + t;
    const acc m = acc(val<M>(in.mask, i)), lp = val<T>(in.logprobs, i);
    const acc adv = in.adv_per_seq ? val<T>(in.advantages, b) : val<T>(in.advantages, i);
    const acc log_ratio = lp - val<T>(in.old_logprobs, i), ratio = std::exp(log_ratio);
    const acc pg1 = -adv * ratio;
    const acc pg2 = -adv * (ratio < lo ? lo : ratio > hi ? hi : ratio);
    s[kSumPg] += m * (pg2 > pg1 ? pg2 : pg1);  // a NaN in pg1 stays NaN, as torch.minimum
    s[kSumLow] += ratio < lo && adv < 0 ? m : acc(0);   // the clip is active only for A's sign
    s[kSumHigh] += ratio > hi && adv > 0 ? m : acc(0);
    s[kSumK3] += m * ((ratio - one) - log_ratio);  // k3 between new and old, joschu.net/blog/kl-approx.html
    s[kSumRatio] += m * ratio;
    acc ed_m1 = 0;  // e^d - 1
    if (in.ref_logprobs) {
      const acc d = val<T>(in.ref_logprobs, i) - lp;
      ed_m1 = std::exp(d) - one;
      s[kSumKl] += m * (ed_m1 - d);  // k3 to the reference
    }
    if (in.entropy) s[kSumEnt] += m * val<T>(in.entropy, i);
    if (m != acc(0)) rmax = std::max(rmax, double(ratio));
    if (!g_lp) continue;
    const acc tie = pg1 == pg2 ? half : acc(0), in_r = ratio >= lo && ratio <= hi ? one : acc(0);
    acc d_l = pg1 * (acc(pg1 > pg2) + tie + (acc(pg2 > pg1) + tie) * in_r);  // d pg / d logp
    if (in.beta > 0) d_l -= acc(in.beta) * ed_m1;                             // d k3 / d logp = 1 - e^d
    const acc wm = acc(w) * m;
    g_lp[t] = wm * d_l;
    if (g_ent) g_ent[t] = acc(-in.ent_coef) * wm;
  }
}

#if defined(FR_HAVE_AVX2)
// The same sums and gradients, 8 tokens at a time: sums in fp32 lanes over blocks of kBlock tokens,
// then in double; comparisons stay lane masks (and-ed with m, or blended).
constexpr int64_t kBlock = 64;

template <bool kFull, class X> inline __m256 ld(const void* base, int64_t i, int64_t n) {
  const X* ptr = at<X>(base, i);
  if constexpr (kFull) return simd::load8(ptr);
  else return simd::load_tail(ptr, n, 0.0f);  // pads: m = 0, finite terms
}
template <bool kFull> inline void st(float* ptr, int64_t n, __m256 x) {
  if constexpr (kFull) simd::store8(ptr, x);
  else simd::store_tail(ptr, n, x);
}

template <class T, class M>
struct Avx2Row {
  const PolicyLossInputs& in;
  __m256 lo, hi, one, half, beta, w, d_ent;  // d_ent = -ent_coef w, the entropy gradient per unit of m
  float *g_lp, *g_ent;                       // (T,) this row's gradients, or nullptr
  __m256 adv_row;                            // the row's advantage, broadcast (adv_per_seq)
  __m256 sum[kNumSums], rmax;                // fp32 lane sums of the current block; max live ratio (dead: 0)

  // Tokens [t, t + n) of the row starting at flat index i0; n == 8 when kFull.
  template <bool kFull>
  inline void step(int64_t i0, int64_t t, int64_t n) {
    const int64_t i = i0 + t;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 m = ld<kFull, M>(in.mask, i, n);
    const __m256 lp = ld<kFull, T>(in.logprobs, i, n), olp = ld<kFull, T>(in.old_logprobs, i, n);
    const __m256 adv = in.adv_per_seq ? adv_row : ld<kFull, T>(in.advantages, i, n);
    const __m256 ref = in.ref_logprobs ? ld<kFull, T>(in.ref_logprobs, i, n) : zero;
    const __m256 ent = in.entropy ? ld<kFull, T>(in.entropy, i, n) : zero;
    if (_mm256_movemask_ps(_mm256_cmp_ps(m, zero, _CMP_NEQ_UQ)) == 0) {
      // 8 masked-out tokens (padding): with finite inputs they add exact zeros to every sum and get
      // zero gradients, so skip their math. Inf/NaN inputs take the full path, as in the reference.
      const __m256 x = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(lp, olp), adv), _mm256_add_ps(ref, ent));
      if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(x, x), zero, _CMP_NEQ_UQ)) == 0) {
        if (g_lp) st<kFull>(g_lp + t, n, zero);
        if (g_ent) st<kFull>(g_ent + t, n, zero);
        return;
      }
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 log_ratio = _mm256_sub_ps(lp, olp), ratio = simd::exp(log_ratio);
    const __m256 pg1 = _mm256_xor_ps(_mm256_mul_ps(adv, ratio), sign);  // -A r
    const __m256 pg2 = _mm256_xor_ps(_mm256_mul_ps(adv, _mm256_min_ps(_mm256_max_ps(ratio, lo), hi)), sign);
    sum[kSumPg] = _mm256_fmadd_ps(m, _mm256_max_ps(pg2, pg1), sum[kSumPg]);  // NaN in pg1 -> pg1
    const __m256 low = _mm256_and_ps(_mm256_cmp_ps(ratio, lo, _CMP_LT_OQ), _mm256_cmp_ps(adv, zero, _CMP_LT_OQ));
    const __m256 high = _mm256_and_ps(_mm256_cmp_ps(ratio, hi, _CMP_GT_OQ), _mm256_cmp_ps(adv, zero, _CMP_GT_OQ));
    sum[kSumLow] = _mm256_add_ps(sum[kSumLow], _mm256_and_ps(low, m));
    sum[kSumHigh] = _mm256_add_ps(sum[kSumHigh], _mm256_and_ps(high, m));
    const __m256 k3 = _mm256_sub_ps(_mm256_sub_ps(ratio, one), log_ratio);  // joschu.net/blog/kl-approx.html
    sum[kSumK3] = _mm256_fmadd_ps(m, k3, sum[kSumK3]);
    sum[kSumRatio] = _mm256_fmadd_ps(m, ratio, sum[kSumRatio]);
    __m256 ed_m1 = zero;  // e^d - 1, d = ref - logp
    if (in.ref_logprobs) {
      const __m256 d = _mm256_sub_ps(ref, lp);
      ed_m1 = _mm256_sub_ps(simd::exp(d), one);
      sum[kSumKl] = _mm256_fmadd_ps(m, _mm256_sub_ps(ed_m1, d), sum[kSumKl]);
    }
    sum[kSumEnt] = _mm256_fmadd_ps(m, ent, sum[kSumEnt]);  // ent = 0 without entropy
    // ratio >= 0, so zeroing dead lanes leaves the max of the live ones (0 when none)
    rmax = _mm256_max_ps(rmax, _mm256_and_ps(_mm256_cmp_ps(m, zero, _CMP_NEQ_OQ), ratio));
    if (!g_lp) return;
    // d pg / d logp = pg1 f: f = 1 where pg1 wins the max, in_range(r) where the clamped pg2 wins,
    // their mean on a tie (see row_scalar)
    const __m256 in_r = _mm256_and_ps(_mm256_cmp_ps(ratio, lo, _CMP_GE_OQ), _mm256_cmp_ps(ratio, hi, _CMP_LE_OQ));
    __m256 f = _mm256_blendv_ps(_mm256_blendv_ps(half, one, in_r), _mm256_and_ps(in_r, one),
                                _mm256_cmp_ps(pg2, pg1, _CMP_GT_OQ));
    f = _mm256_blendv_ps(f, one, _mm256_cmp_ps(pg1, pg2, _CMP_GT_OQ));
    __m256 d_l = _mm256_mul_ps(pg1, f);
    if (in.beta > 0) d_l = _mm256_fnmadd_ps(beta, ed_m1, d_l);  // + beta (1 - e^d)
    st<kFull>(g_lp + t, n, _mm256_mul_ps(_mm256_mul_ps(w, m), d_l));
    if (g_ent) st<kFull>(g_ent + t, n, _mm256_mul_ps(d_ent, m));
  }
};

template <class T, class M>
void row_avx2(const PolicyLossParams& p, int64_t b, double w, double* s, double& rmax) {
  const PolicyLossInputs& in = p.in;
  const int64_t i0 = b * in.T;
  float* grads = static_cast<float*>(p.grads);
  const __m256 adv_row = in.adv_per_seq ? _mm256_set1_ps(val<T>(in.advantages, b)) : _mm256_setzero_ps();
  Avx2Row<T, M> r{in,
                  _mm256_set1_ps(float(1.0 - in.eps_low)),
                  _mm256_set1_ps(float(1.0 + in.eps_high)),
                  _mm256_set1_ps(1.0f),
                  _mm256_set1_ps(0.5f),
                  _mm256_set1_ps(float(in.beta)),
                  _mm256_set1_ps(float(w)),
                  _mm256_set1_ps(float(-in.ent_coef * w)),
                  grads ? grads + i0 : nullptr,
                  grads && in.entropy ? grads + in.B * in.T + i0 : nullptr,
                  adv_row,
                  {},
                  _mm256_setzero_ps()};
  for (int64_t blk = 0; blk < in.T; blk += kBlock) {
    for (__m256& x : r.sum) x = _mm256_setzero_ps();
    const int64_t end = std::min(in.T, blk + kBlock);
    int64_t t = blk;
    for (; t + 8 <= end; t += 8) r.template step<true>(i0, t, 8);
    if (t < end) r.template step<false>(i0, t, end - t);
    for (int k = 0; k < kNumSums; ++k) s[k] += simd::hsum_d(r.sum[k]);
  }
  const float row_max = simd::hmax(r.rmax);
  if (row_max > 0.0f) rmax = std::max(rmax, double(row_max));  // 0: no live token (or all ratios 0)
}
#endif

template <class T, class M>
void row(const PolicyLossParams& p, int64_t b, double w, double* s, double& rmax) {
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) return row_avx2<T, M>(p, b, w, s, rmax);
#endif
  row_scalar<T, M>(p, b, w, s, rmax);
}

// Rows [b0, b1): part (kPartSize,) = their masked sums, loss and max live ratio.
template <class T, class M>
void chunk(const PolicyLossParams& p, const double* row_w, int64_t b0, int64_t b1, double* part) {
  std::fill(part, part + kPartSize, 0.0);
  part[kPartMax] = -INFINITY;
  for (int64_t b = b0; b < b1; ++b) {
    double s[kNumSums] = {};
    row<T, M>(p, b, row_w[b], s, part[kPartMax]);
    for (int k = 0; k < kNumSums; ++k) part[k] += s[k];
    part[kPartLoss] += row_w[b] * row_loss(p.in, s);
  }
}

// The mask's sum over row b, in a fixed order: 0/1 counts are exact; weights are summed in double.
template <class M>
double row_mask_sum(const PolicyLossInputs& in, int64_t b) {
  const M* m = static_cast<const M*>(in.mask) + b * in.T;  // (T,)
  if constexpr (std::is_same_v<M, uint8_t>) {
    int64_t count = 0;
    for (int64_t t = 0; t < in.T; ++t) count += m[t];
    return double(count);
  } else {
    double s = 0;
    for (int64_t t = 0; t < in.T; ++t) s += double(to_acc(m[t]));
    return s;
  }
}

// Row weights w_b of the aggregation (policy_loss.h); *n = max(sum m, 1), the token means' divisor.
template <class M>
std::vector<double> row_weights(const PolicyLossInputs& in, double* n) {
  std::vector<double> c(size_t(in.B));  // (B,) row mask sums
  const int64_t grain = std::max<int64_t>(1, kGrainChunks * kChunkTokens / std::max<int64_t>(in.T, 1));
  parallel_for(0, in.B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) c[size_t(b)] = row_mask_sum<M>(in, b);
  });
  double total = 0;
  int64_t live = 0;
  for (double cb : c) total += cb, live += cb > 0;
  *n = std::max(total, 1.0);
  const double S = double(std::max<int64_t>(live, 1));  // rows with no token count for nothing
  for (double& cb : c) {
    switch (in.agg) {
      case PolicyAgg::kTokenMean: cb = 1.0 / *n; break;
      case PolicyAgg::kSeqMeanTokenMean: cb = 1.0 / (std::max(cb, 1.0) * S); break;
      case PolicyAgg::kSeqMeanTokenSumNorm: cb = 1.0 / (in.max_len * S); break;
    }
  }
  return c;
}

// Dispatches T over the float dtypes and M over {bool mask, weight mask of dtype T}.
#define FR_POLICY_DISPATCH(in, ...)                                                       \
  FR_DISPATCH_FLOAT((in).dtype, if ((in).mask_is_bool) {                                   \
    using mask_t = uint8_t;                                                                \
    __VA_ARGS__;                                                                           \
  } else {                                                                                 \
    using mask_t = scalar_t;                                                               \
    __VA_ARGS__;                                                                           \
  })

template <class T, class M>
void policy_loss(const PolicyLossParams& p) {
  using acc = acc_t<T>;
  const PolicyLossInputs& in = p.in;
  double n = 1;
  const std::vector<double> row_w = row_weights<M>(in, &n);  // (B,)
  const int64_t row_tokens = std::max<int64_t>(in.T, 1);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkTokens / row_tokens);
  const int64_t chunks = (in.B + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<double> parts(size_t(chunks) * kPartSize);  // (chunks, kPartSize)
  const int64_t grain = std::max<int64_t>(1, kGrainChunks * kChunkTokens / (rows_per_chunk * row_tokens));
  parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch)
      chunk<T, M>(p, row_w.data(), ch * rows_per_chunk, std::min(in.B, (ch + 1) * rows_per_chunk),
                  &parts[size_t(ch) * kPartSize]);
  });
  double s[kNumSums] = {}, loss = 0, rmax = -INFINITY;
  for (int64_t ch = 0; ch < chunks; ++ch) {  // chunk order: the same sums for any thread count
    const double* part = &parts[size_t(ch) * kPartSize];
    for (int k = 0; k < kNumSums; ++k) s[k] += part[k];
    loss += part[kPartLoss];
    rmax = std::max(rmax, part[kPartMax]);
  }
  double st[kNumPolicyStats];
  st[kPlPgLoss] = s[kSumPg] / n;
  st[kPlKl] = s[kSumKl] / n;
  st[kPlClipfracLow] = s[kSumLow] / n;
  st[kPlClipfracHigh] = s[kSumHigh] / n;
  st[kPlApproxKl] = s[kSumK3] / n;
  st[kPlRatioMean] = s[kSumRatio] / n;
  st[kPlRatioMax] = rmax == -INFINITY ? 0.0 : rmax;  // no live token: 0, as the reference
  st[kPlEntropy] = s[kSumEnt] / n;
  acc* stats = static_cast<acc*>(p.stats);
  for (int k = 0; k < kNumPolicyStats; ++k) stats[k] = acc(st[k]);
  *static_cast<T*>(p.loss) = from_acc<T>(acc(loss));
}

}  // namespace

void policy_loss_cpu(const PolicyLossParams& p) { FR_POLICY_DISPATCH(p.in, policy_loss<scalar_t, mask_t>(p)); }

}  // namespace fr::FR_ISA_NS
