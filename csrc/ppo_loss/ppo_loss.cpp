// ppo_loss: per token (m = mask weight, n = max(sum m, 1), r = exp(logp - old_logp)):
//   pg  = max(-A r, -A clamp(r, 1 - c, 1 + c))          clipped  = [second term > first]
//   vl  = max((v - R)^2, (v_c - R)^2),  v_c = v_old + clamp(v - v_old, -c_v, c_v)
//   loss = sum m pg / n + vf_coef * 0.5 sum m vl / n - ent_coef * sum m H / n
// One pass: the mask is summed first (n), then fixed 1024-token chunks are processed in parallel;
// each writes its tokens' gradients (final, since 1 / n is known) and its partial sums, which are
// added (doubles) in chunk order, so results do not depend on the thread count. The gradients
// follow autograd's rules for the reference exactly: torch.maximum sends half the gradient to
// each side of a tie, torch.clamp passes it where min <= x <= max.
#include "ppo_loss/ppo_loss.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/simd.h"

namespace fr::FR_ISA_NS {
namespace {

constexpr int64_t kChunk = 1024;  // tokens per partial sum
enum Slot : int { kSumPg = 0, kSumVl, kSumClip, kSumVclip, kSumK3, kSumRatio, kSumEnt, kNumSums };

// ---- per-token math, written once for scalars (float, double) and 8 fp32 lanes ---------------
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V vmax(V a, V b) { return a > b ? a : b; }
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V vmin(V a, V b) { return a < b ? a : b; }
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V vexp(V a) { return std::exp(a); }
// Comparisons as 0/1 factors.
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V gt(V a, V b) { return V(a > b); }
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V eq(V a, V b) { return V(a == b); }
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V in_range(V x, V lo, V hi) { return V(x >= lo && x <= hi); }
template <class V, std::enable_if_t<std::is_floating_point_v<V>, int> = 0>
inline V pick(V cond01, V a, V b) { return cond01 != V(0) ? a : b; }

#if defined(FR_HAVE_AVX2)
struct F8 {
  __m256 v;
};
inline F8 operator+(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 operator-(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F8 operator*(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F8 operator-(F8 a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))}; }
inline F8 vmax(F8 a, F8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline F8 vmin(F8 a, F8 b) { return {_mm256_min_ps(a.v, b.v)}; }
inline F8 vexp(F8 a) { return {simd::exp(a.v)}; }
inline F8 in_range(F8 x, F8 lo, F8 hi) {  // 1.0 / 0.0
  const __m256 in = _mm256_and_ps(_mm256_cmp_ps(x.v, lo.v, _CMP_GE_OQ), _mm256_cmp_ps(x.v, hi.v, _CMP_LE_OQ));
  return {_mm256_and_ps(in, _mm256_set1_ps(1.0f))};
}
inline F8 pick(F8 cond01, F8 a, F8 b) {
  return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(cond01.v, _mm256_setzero_ps(), _CMP_NEQ_OQ))};
}
#endif

template <class V>
struct Consts {
  V lo, hi, cv_lo, cv_hi, half;  // 1 - c, 1 + c, -c_v, c_v, 0.5
};

template <class V>
struct Token {
  V log_ratio, ratio;
  V pg1, pg2;        // -A r, -A clamp(r)
  V v_in;            // 1 where |v - v_old| <= c_v, else 0
  V v_err, vc_err;   // v - R, v_c - R
};

template <class V>
inline Token<V> token(V lp, V olp, V adv, V v, V ov, V ret, const Consts<V>& c) {
  Token<V> t;
  t.log_ratio = lp - olp;
  t.ratio = vexp(t.log_ratio);
  t.pg1 = -adv * t.ratio;
  t.pg2 = -adv * vmin(vmax(t.ratio, c.lo), c.hi);
  const V v_delta = v - ov;
  t.v_in = in_range(v_delta, c.cv_lo, c.cv_hi);
  t.v_err = v - ret;
  // v_c is v itself inside the clip range: v_old + (v - v_old) would round away from v and turn
  // exact ties of the two value losses into spurious "clipped" tokens.
  t.vc_err = pick(t.v_in, t.v_err, ov + vmin(vmax(v_delta, c.cv_lo), c.cv_hi) - ret);
  return t;
}

// d loss / d logp and d loss / d v of one token, given w_pg = g m / n and w_v = vf_coef g m / n.
template <class V>
inline void token_grads(const Token<V>& t, V w_pg, V w_v, const Consts<V>& c, V& d_lp, V& d_v) {
  const V tie = c.half * eq(t.pg1, t.pg2);
  d_lp = w_pg * t.pg1 * (gt(t.pg1, t.pg2) + tie + (gt(t.pg2, t.pg1) + tie) * in_range(t.ratio, c.lo, c.hi));
  const V vl1 = t.v_err * t.v_err, vl2 = t.vc_err * t.vc_err, vtie = c.half * eq(vl1, vl2);
  // 0.5 d(x^2) = x: the 0.5 of v_loss cancels the 2
  d_v = w_v * ((gt(vl1, vl2) + vtie) * t.v_err +
               (gt(vl2, vl1) + vtie) * t.vc_err * t.v_in);
}

template <class V>
Consts<V> make_consts(const PpoLossInputs& p, V (*bc)(double)) {
  return {bc(1.0 - p.clip_range), bc(1.0 + p.clip_range), bc(-p.clip_range_value), bc(p.clip_range_value),
          bc(0.5)};
}

template <class X> const X* at(const void* base, int64_t i) { return static_cast<const X*>(base) + i; }
// Element i as acc_t (a bool mask byte as 0.0 / 1.0).
template <class X> auto val(const void* base, int64_t i) {
  if constexpr (std::is_same_v<X, uint8_t>) return float(*at<X>(base, i));
  else return to_acc(*at<X>(base, i));
}

// ---- one chunk [b, e): partial sums, and the gradients when p.grads ---------------------------
// part: kNumSums masked sums, then the max ratio over tokens with m != 0 (-inf if none).
// inv_n = 1 / max(sum m, 1); a token's gradient weights are m / n (logprobs), vf_coef m / n
// (values) and -ent_coef m / n (entropy).
template <class T, class M>
void chunk_scalar(const PpoLossParams& p, double inv_n, int64_t b, int64_t e, double* part) {
  using acc = acc_t<T>;
  const PpoLossInputs& in = p.in;
  const Consts<acc> c = make_consts<acc>(in, [](double x) { return acc(x); });
  acc* g_lp = static_cast<acc*>(p.grads);                   // (N,) rows of grads (K, N)
  acc* g_v = g_lp ? g_lp + in.N : nullptr;                  // (N,)
  acc* g_ent = g_lp && in.entropy ? g_lp + 2 * in.N : nullptr;  // (N,)
  double s[kNumSums] = {};
  double rmax = -INFINITY;
  for (int64_t i = b; i < e; ++i) {
    const acc m = acc(val<M>(in.mask, i));
    const Token<acc> t = token<acc>(val<T>(in.logprobs, i), val<T>(in.old_logprobs, i),
                                    val<T>(in.advantages, i), val<T>(in.values, i),
                                    val<T>(in.old_values, i), val<T>(in.returns, i), c);
    const acc vl1 = t.v_err * t.v_err, vl2 = t.vc_err * t.vc_err;
    s[kSumPg] += m * vmax(t.pg1, t.pg2);
    s[kSumVl] += m * vmax(vl1, vl2);
    s[kSumClip] += m * gt(t.pg2, t.pg1);
    s[kSumVclip] += m * gt(vl2, vl1);
    s[kSumK3] += m * ((t.ratio - acc(1)) - t.log_ratio);  // k3, http://joschu.net/blog/kl-approx.html
    s[kSumRatio] += m * t.ratio;
    if (in.entropy) s[kSumEnt] += m * val<T>(in.entropy, i);
    if (m != acc(0)) rmax = std::max(rmax, double(t.ratio));
    if (g_lp) {
      token_grads<acc>(t, acc(m * inv_n), acc(m * inv_n * in.vf_coef), c, g_lp[i], g_v[i]);
      if (g_ent) g_ent[i] = acc(-m * inv_n * in.ent_coef);
    }
  }
  std::copy(s, s + kNumSums, part);
  part[kNumSums] = rmax;
}

#if defined(FR_HAVE_AVX2)
// The AVX2 chunk writes the scalar path's sums and gradients with fewer instructions: comparisons
// stay lane masks (and-ed with m, or blended) instead of 0/1 factors, and products accumulate by FMA.
constexpr int64_t kBlock = 64;  // tokens summed in fp32 lanes before the partials go to double

template <bool kFull, class X> inline __m256 ld(const void* base, int64_t i, int64_t n) {
  const X* ptr = at<X>(base, i);
  if constexpr (kFull) return simd::load8(ptr);
  else return simd::load_tail(ptr, n, 0.0f);  // pads: m = 0, finite terms
}
template <bool kFull> inline void st(float* ptr, int64_t n, __m256 x) {
  if constexpr (kFull) simd::store8(ptr, x);
  else simd::store_tail(ptr, n, x);
}
inline __m256 cmp_gt(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }

template <class T, class M>
struct Avx2Chunk {
  const PpoLossInputs& in;
  Consts<F8> c;
  __m256 one, s_pg, s_v, s_ent;  // 1, then the gradient weights per unit of m: 1/n, vf_coef/n, -ent_coef/n
  float *g_lp, *g_v, *g_ent;     // (N,) rows of grads (K, N), or nullptr
  __m256 sum[kNumSums], rmax;    // fp32 lane sums of the current block; max ratio of live tokens (dead: 0)

  // Tokens [i, i + n), n == 8 when kFull.
  template <bool kFull>
  inline void step(int64_t i, int64_t n) {
    const __m256 m = ld<kFull, M>(in.mask, i, n);
    const __m256 lp = ld<kFull, T>(in.logprobs, i, n), olp = ld<kFull, T>(in.old_logprobs, i, n);
    const __m256 adv = ld<kFull, T>(in.advantages, i, n), v = ld<kFull, T>(in.values, i, n);
    const __m256 ov = ld<kFull, T>(in.old_values, i, n), ret = ld<kFull, T>(in.returns, i, n);
    const __m256 ent = in.entropy ? ld<kFull, T>(in.entropy, i, n) : _mm256_setzero_ps();
    const __m256 zero = _mm256_setzero_ps();
    if (_mm256_movemask_ps(_mm256_cmp_ps(m, zero, _CMP_NEQ_UQ)) == 0) {
      // 8 masked-out tokens (the padding of short responses): with finite inputs they add exact zeros
      // to every sum and get zero gradients, so skip their math. Inf/NaN inputs take the full path,
      // where 0 * inf = NaN reaches the sums as in the reference.
      const __m256 x = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(lp, olp), _mm256_add_ps(adv, v)),
                                     _mm256_add_ps(_mm256_add_ps(ov, ret), ent));
      if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(x, x), zero, _CMP_NEQ_UQ)) == 0) {
        if (g_lp) {
          st<kFull>(g_lp + i, n, zero);
          st<kFull>(g_v + i, n, zero);
          if (g_ent) st<kFull>(g_ent + i, n, zero);
        }
        return;
      }
    }
    const Token<F8> t = token<F8>({lp}, {olp}, {adv}, {v}, {ov}, {ret}, c);
    const __m256 pg1 = t.pg1.v, pg2 = t.pg2.v, ratio = t.ratio.v;
    const __m256 vl1 = _mm256_mul_ps(t.v_err.v, t.v_err.v), vl2 = _mm256_mul_ps(t.vc_err.v, t.vc_err.v);
    const __m256 clip = cmp_gt(pg2, pg1), pg1_wins = cmp_gt(pg1, pg2);
    const __m256 vclip = cmp_gt(vl2, vl1), vl1_wins = cmp_gt(vl1, vl2);
    sum[kSumPg] = _mm256_fmadd_ps(m, _mm256_max_ps(pg1, pg2), sum[kSumPg]);
    sum[kSumVl] = _mm256_fmadd_ps(m, _mm256_max_ps(vl1, vl2), sum[kSumVl]);
    sum[kSumClip] = _mm256_add_ps(sum[kSumClip], _mm256_and_ps(clip, m));
    sum[kSumVclip] = _mm256_add_ps(sum[kSumVclip], _mm256_and_ps(vclip, m));
    const __m256 k3 = _mm256_sub_ps(_mm256_sub_ps(ratio, one), t.log_ratio.v);  // joschu.net/blog/kl-approx.html
    sum[kSumK3] = _mm256_fmadd_ps(m, k3, sum[kSumK3]);
    sum[kSumRatio] = _mm256_fmadd_ps(m, ratio, sum[kSumRatio]);
    sum[kSumEnt] = _mm256_fmadd_ps(m, ent, sum[kSumEnt]);  // ent = 0 without entropy
    // ratio >= 0, so zeroing dead lanes leaves the max of the live ones (0 when none, as wanted)
    rmax = _mm256_max_ps(rmax, _mm256_and_ps(_mm256_cmp_ps(m, zero, _CMP_NEQ_OQ), ratio));
    if (!g_lp) return;
    // d/d logprobs = w pg1 f: f = 1 where pg1 wins the max, in_range(ratio) where the clamped pg2
    // wins, their mean on a tie (torch.maximum splits it); see token_grads.
    const __m256 in_r = _mm256_and_ps(_mm256_cmp_ps(ratio, c.lo.v, _CMP_GE_OQ), _mm256_cmp_ps(ratio, c.hi.v, _CMP_LE_OQ));
    __m256 f = _mm256_blendv_ps(_mm256_blendv_ps(c.half.v, one, in_r), _mm256_and_ps(in_r, one), clip);
    f = _mm256_blendv_ps(f, one, pg1_wins);
    const __m256 w = _mm256_mul_ps(m, s_pg);
    st<kFull>(g_lp + i, n, _mm256_mul_ps(_mm256_mul_ps(w, pg1), f));
    // d/d values = vf_coef m / n times v_err, vc_err v_in, or their mean on a tie
    const __m256 e2 = _mm256_mul_ps(t.vc_err.v, t.v_in.v);
    __m256 dv = _mm256_mul_ps(c.half.v, _mm256_add_ps(t.v_err.v, e2));
    dv = _mm256_blendv_ps(_mm256_blendv_ps(dv, e2, vclip), t.v_err.v, vl1_wins);
    st<kFull>(g_v + i, n, _mm256_mul_ps(_mm256_mul_ps(m, s_v), dv));
    if (g_ent) st<kFull>(g_ent + i, n, _mm256_mul_ps(m, s_ent));
  }
};

template <class T, class M>
void chunk_avx2(const PpoLossParams& p, double inv_n, int64_t b, int64_t e, double* part) {
  const PpoLossInputs& in = p.in;
  auto bc = [](double x) { return F8{_mm256_set1_ps(float(x))}; };
  float* g_lp = static_cast<float*>(p.grads);
  Avx2Chunk<T, M> k{in, make_consts<F8>(in, bc), _mm256_set1_ps(1.0f), _mm256_set1_ps(float(inv_n)),
                    _mm256_set1_ps(float(inv_n * in.vf_coef)), _mm256_set1_ps(float(-inv_n * in.ent_coef)),
                    g_lp, g_lp ? g_lp + in.N : nullptr, g_lp && in.entropy ? g_lp + 2 * in.N : nullptr, {},
                    _mm256_setzero_ps()};
  double s[kNumSums] = {};
  for (int64_t blk = b; blk < e; blk += kBlock) {
    for (__m256& x : k.sum) x = _mm256_setzero_ps();
    const int64_t end = std::min(e, blk + kBlock);
    int64_t i = blk;
    for (; i + 8 <= end; i += 8) k.template step<true>(i, 8);
    if (i < end) k.template step<false>(i, end - i);
    for (int j = 0; j < kNumSums; ++j) s[j] += simd::hsum_d(k.sum[j]);
  }
  std::copy(s, s + kNumSums, part);
  const float rmax = simd::hmax(k.rmax);
  part[kNumSums] = rmax > 0.0f ? double(rmax) : -INFINITY;  // 0: no live token (or all ratios 0)
}
#endif

template <class T, class M>
void chunk(const PpoLossParams& p, double inv_n, int64_t b, int64_t e, double* part) {
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) return chunk_avx2<T, M>(p, inv_n, b, e, part);
#endif
  chunk_scalar<T, M>(p, inv_n, b, e, part);
}

// sum of the mask in a fixed order: 0/1 counts are exact; weights use 8 interleaved doubles.
template <class M>
double mask_sum(const PpoLossInputs& p) {
  const M* m = static_cast<const M*>(p.mask);
  if constexpr (std::is_same_v<M, uint8_t>) {
    int64_t count = 0;
    for (int64_t i = 0; i < p.N; ++i) count += m[i];
    return double(count);
  } else {
    double s[8] = {};
    int64_t i = 0;
    for (; i + 8 <= p.N; i += 8)
      for (int j = 0; j < 8; ++j) s[j] += double(to_acc(m[i + j]));
    for (; i < p.N; ++i) s[0] += double(to_acc(m[i]));
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }
}

// Dispatches T over the float dtypes and M over {bool mask, weight mask of dtype T}.
#define FR_PPO_DISPATCH(in, ...)                                                          \
  FR_DISPATCH_FLOAT((in).dtype, if ((in).mask_is_bool) {                                   \
    using mask_t = uint8_t;                                                                \
    __VA_ARGS__;                                                                           \
  } else {                                                                                 \
    using mask_t = scalar_t;                                                               \
    __VA_ARGS__;                                                                           \
  })

// Tokens per task >= 64k: a (64, 512) batch runs on the calling thread. Waking a second thread costs
// more than its share of the work, and far more on a busy machine.
constexpr int64_t kGrainChunks = 64;

template <class T, class M>
void ppo_loss(const PpoLossParams& p) {
  using acc = acc_t<T>;
  const PpoLossInputs& in = p.in;
  const double n = std::max(mask_sum<M>(in), 1.0);
  const int64_t chunks = (in.N + kChunk - 1) / kChunk;
  std::vector<double> parts(size_t(chunks) * (kNumSums + 1));  // (chunks, kNumSums + 1)
  parallel_for(0, chunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch)
      chunk<T, M>(p, 1.0 / n, ch * kChunk, std::min(in.N, (ch + 1) * kChunk), &parts[size_t(ch) * (kNumSums + 1)]);
  });
  double s[kNumSums] = {}, rmax = -INFINITY;
  for (int64_t ch = 0; ch < chunks; ++ch) {  // chunk order: the same sums for any thread count
    const double* part = &parts[size_t(ch) * (kNumSums + 1)];
    for (int k = 0; k < kNumSums; ++k) s[k] += part[k];
    rmax = std::max(rmax, part[kNumSums]);
  }
  double st[kNumPpoStats];
  st[kPgLoss] = s[kSumPg] / n;
  st[kVLoss] = 0.5 * s[kSumVl] / n;
  st[kClipfrac] = s[kSumClip] / n;
  st[kVfClipfrac] = s[kSumVclip] / n;
  st[kApproxKl] = s[kSumK3] / n;
  st[kRatioMean] = s[kSumRatio] / n;
  st[kRatioMax] = rmax == -INFINITY ? 0.0 : rmax;  // no live token: 0, as the reference
  st[kEntropy] = s[kSumEnt] / n;
  acc* stats = static_cast<acc*>(p.stats);
  for (int k = 0; k < kNumPpoStats; ++k) stats[k] = acc(st[k]);
  const double loss = st[kPgLoss] + in.vf_coef * st[kVLoss] - in.ent_coef * st[kEntropy];
  *static_cast<T*>(p.loss) = from_acc<T>(acc(loss));
}

template <class T>
void scale(const PpoLossScaleParams& p) {
  using acc = acc_t<T>;
  const acc* g = static_cast<const acc*>(p.grads);
  T* out = static_cast<T*>(p.out);
  const acc s = acc(p.grad_loss);
  for (int64_t i = 0; i < p.n; ++i) out[i] = from_acc<T>(g[i] * s);
}

}  // namespace

void ppo_loss_scale_cpu(const PpoLossScaleParams& p) { FR_DISPATCH_FLOAT(p.dtype, scale<scalar_t>(p)); }

void ppo_loss_cpu(const PpoLossParams& p) { FR_PPO_DISPATCH(p.in, ppo_loss<scalar_t, mask_t>(p)); }

}  // namespace fr::FR_ISA_NS
