// token_logprobs: one task per block of rows. With y = x / T and p = softmax(y):
//   logprob = y[target] - lse,  entropy = lse - E_p[y],  lse = log sum exp y,
//   d x_i = (g_lp * (1[i == target] - p_i) - g_H * p_i * (y_i - E_p[y])) / T.
// The forward reads each row from memory once: it walks the row in L1-sized chunks, takes the
// chunk's max, then accumulates sum e^(y - M) and sum e^(y - M) (y - M) against the running max
// M, rescaling the running sums when M grows (online softmax, Milakov & Gimelshein 2018,
// arXiv 1805.02867). Working relative to M keeps the entropy free of cancellation.
// Range: everything is relative to the row's max logit M, subtracted before scaling: exponents are
// (x - M) / T, and the statistics are kept apart from M (logprobs.h: RowStats' fields are what the
// backward gets). Never x / T - M / T: at |x| ~ 1e9 a float M / T is off by up to half its ulp (64), which
// made e^64-sized terms (then +inf log-probs, NaN entropies), and at |x| ~ 1e30 even a double lse = M / T
// + log S drops log S. x - M is exact for every logit that carries mass (Sterbenz), so the results keep
// their accuracy at any magnitude, and log p <= 0, H >= 0 hold by construction.
#include "logprobs/logprobs.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/simd.h"

namespace fr::FR_ISA_NS {
namespace {

// A row's statistics relative to its max logit M, with d = (x - M) / T:
// lse = M / T + log_s, E_p[y] = M / T + mean_d, entropy = log_s - mean_d (log_s >= 0 >= mean_d).
struct RowStats {
  double M;       // max logit (-inf for a row of -inf)
  double log_s;   // log sum e^d
  double mean_d;  // E_p[d]
};

// Portable path (baseline ISA and float64): two passes over the row, math in double.
template <class T>
RowStats row_stats_scalar(const T* x, int64_t V, double inv_t) {
  double M = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < V; ++i) M = std::max(M, double(to_acc(x[i])));
  double s = 0, t = 0;
  for (int64_t i = 0; i < V; ++i) {
    const double d = (double(to_acc(x[i])) - M) * inv_t;
    const double e = std::exp(d);
    s += e;
    if (e > 0) t += e * d;  // e == 0 where x == -inf: no 0 * inf
  }
  return {M, std::log(s), t / s};
}

// d x of g_lp log p[target] + g_h H: p = e^(d - log_s), H's term p (d - mean_d), as the header's formula.
template <class T>
void row_grad_scalar(const T* x, T* dx, int64_t V, double inv_t, const RowStats& st, double g_lp, double g_h,
                     int64_t target) {
  for (int64_t i = 0; i < V; ++i) {
    const double d = (double(to_acc(x[i])) - st.M) * inv_t, p = std::exp(d - st.log_s);
    const double pd = p > 0 ? p * (d - st.mean_d) : 0.0;
    dx[i] = from_acc<T>(acc_t<T>(-(g_lp * p + g_h * pd) * inv_t + (i == target ? g_lp * inv_t : 0.0)));
  }
}

#if defined(FR_HAVE_AVX2)
constexpr int64_t kChunk = 2048;  // elements: 8 KiB of fp32, re-read from L1 after the max pass
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

// max of x[0, len) (-inf when empty), two accumulators to hide the max latency
template <class T>
inline float block_max(const T* x, int64_t len) {
  using namespace simd;
  const int64_t full = len & ~int64_t(7);
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
  int64_t i = 0;
  for (; i + 16 <= full; i += 16) {
    m0 = _mm256_max_ps(m0, load8(x + i));
    m1 = _mm256_max_ps(m1, load8(x + i + 8));
  }
  if (i < full) m0 = _mm256_max_ps(m0, load8(x + i));
  if (full < len) m1 = _mm256_max_ps(m1, load_tail(x + full, len - full, -INFINITY));
  return hmax(_mm256_max_ps(m0, m1));
}

// One chunk's sums s = sum 2^z, t = sum 2^z z over z = (x - Mn) c2 + rho. kFused forms z as one fused
// x c2 - Mc with Mc = float(Mn c2), which is exact before its one rounding, and rho = Mn c2 - Mc is the
// rounding of Mc: at most half its ulp, so the fused form is taken only while |Mc| < 2^22 (rho <= 1/8);
// beyond, the two-instruction (x - Mn) c2 (rho = 0) keeps 2^z finite (at |x| ~ 1e9, rho reached 256).
template <class T, bool kMean, bool kFused>
inline void chunk_sums(const T* xc, int64_t len, __m256 vc2, float pivot, double& s_out, double& t_out) {
  using namespace simd;
  const int64_t full = len & ~int64_t(7);
  const __m256 vp = _mm256_set1_ps(pivot), lowest = _mm256_set1_ps(-FLT_MAX);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, t0 = s0, t1 = s0;
  auto step = [&](__m256 xv, __m256& s, __m256& t) {
    const __m256 z = kFused ? _mm256_fmsub_ps(xv, vc2, vp) : _mm256_mul_ps(_mm256_sub_ps(xv, vp), vc2);
    const __m256 e = exp2(z);
    s = _mm256_add_ps(s, e);
    if (kMean) t = _mm256_fmadd_ps(e, _mm256_max_ps(z, lowest), t);  // e == 0 at -inf: 0, not NaN
  };
  int64_t i = 0;
  for (; i + 16 <= full; i += 16) {
    step(load8(xc + i), s0, t0);
    step(load8(xc + i + 8), s1, t1);
  }
  if (i < full) step(load8(xc + i), s0, t0);
  if (full < len) step(load_tail(xc + full, len - full, -INFINITY), s1, t1);
  s_out = hsum_d(_mm256_add_ps(s0, s1));
  t_out = hsum_d(_mm256_add_ps(t0, t1));
}

// As row_stats_scalar, in base-2 units relative to the running max logit M: z = (x - M) log2(e) / T <= 0,
// so each lane needs 2^z only.
template <class T, bool kMean>
RowStats row_stats_avx2(const T* x, int64_t V, double inv_t) {
  const float c2 = float(inv_t * kLog2e);
  const __m256 vc2 = _mm256_set1_ps(c2);
  double M = -INFINITY, S = 0, Tm = 0;  // running max of x, sum 2^z, sum 2^z z
  for (int64_t c = 0; c < V; c += kChunk) {
    const T* xc = x + c;
    const int64_t len = std::min(kChunk, V - c);
    const float Mn = std::max(float(M), block_max(xc, len));  // a logit: exact in float
    if (Mn == -INFINITY) continue;  // all -inf so far: nothing to add
    const float Mc = Mn * c2;
    double s, t;
    if (std::fabs(Mc) < 0x1p22f) {
      chunk_sums<T, kMean, true>(xc, len, vc2, Mc, s, t);
      const double rho = double(Mn) * double(c2) - double(Mc);  // exact: a product of floats, Sterbenz
      if (rho != 0) {  // the sums were taken against z + rho: back to z
        const double a = std::exp2(-rho);
        t = a * (t - rho * s);
        s *= a;
      }
    } else {
      chunk_sums<T, kMean, false>(xc, len, vc2, Mn, s, t);
    }
    if (M != -INFINITY && M != Mn) {  // the max grew: move the running sums to the new max
      const double shift = (M - double(Mn)) * double(c2), a = std::exp2(shift);
      Tm = a * (Tm + shift * S);
      S *= a;
    }
    S += s;
    Tm += t;
    M = Mn;
  }
  // back to natural units (S >= 1 and Tm <= 0 up to rounding: the max contributes 2^0)
  return {M, std::log(S), kLn2 * Tm / S};
}

template <class T, bool kEnt>
void row_grad_avx2(const T* x, T* dx, int64_t V, double inv_t, const RowStats& st, float g_lp, float g_h,
                   int64_t target) {
  using namespace simd;
  const float inv_f = float(inv_t);
  const __m256 vM = _mm256_set1_ps(float(st.M)), vinv = _mm256_set1_ps(inv_f);
  const __m256 vc2 = _mm256_set1_ps(float(inv_t * kLog2e)), vls2 = _mm256_set1_ps(float(st.log_s * kLog2e));
  const __m256 vmean = _mm256_set1_ps(float(st.mean_d));
  const __m256 a = _mm256_set1_ps(-g_lp * inv_f), b = _mm256_set1_ps(-g_h * inv_f);
  const __m256 lowest = _mm256_set1_ps(-FLT_MAX);
  auto grad = [&](__m256 xv) {  // without the target's +g_lp / T; p = 2^((x - M) / T - log_s) log2 e)
    const __m256 xm = _mm256_sub_ps(xv, vM);  // exact for the logits that carry mass
    const __m256 p = exp2(_mm256_fmsub_ps(xm, vc2, vls2));
    if (!kEnt) return _mm256_mul_ps(a, p);
    const __m256 pd = _mm256_mul_ps(p, _mm256_max_ps(_mm256_fmsub_ps(xm, vinv, vmean), lowest));
    return _mm256_fmadd_ps(a, p, _mm256_mul_ps(b, pd));
  };
  const float xt = to_acc(x[target]);  // read before the loop: dx may be x (in place)
  const int64_t full = V & ~int64_t(7);
  int64_t i = 0;
  for (; i + 16 <= full; i += 16) {
    store8(dx + i, grad(load8(x + i)));
    store8(dx + i + 8, grad(load8(x + i + 8)));
  }
  if (i < full) store8(dx + i, grad(load8(x + i)));
  if (full < V) store_tail(dx + full, V - full, grad(load_tail(x + full, V - full, -INFINITY)));
  const float gt = _mm256_cvtss_f32(grad(_mm256_set1_ps(xt)));
  dx[target] = from_acc<T>(gt + g_lp * inv_f);
}

// token_logprobs_grad_ on one fp32 row with one exp per element: the first pass stores
// e = 2^((x - M_c) log2 e) in place (M_c the running max logit when chunk c was read) and sums them as
// row_stats_avx2 does; the second turns e into scale * (onehot - p) with p = e e^(M_c - M) / S,
// one multiply per element. Returns log S, with S = sum e^(x - M), and M in row_max: lse = M + log S.
double row_grad_inplace_f32(float* x, int64_t V, double scale, int64_t target, float* chunk_max, float& row_max) {
  using namespace simd;
  const __m256 vc2 = _mm256_set1_ps(float(kLog2e));
  double M = -INFINITY, S = 0;
  for (int64_t c = 0, k = 0; c < V; c += kChunk, ++k) {
    float* xc = x + c;
    const int64_t len = std::min(kChunk, V - c), full = len & ~int64_t(7);
    const float Mn = std::max(float(M), block_max(xc, len));
    chunk_max[k] = Mn;
    const __m256 vM = _mm256_set1_ps(Mn == -INFINITY ? 0.f : Mn);  // all -inf so far: e = 0 below
    auto ex = [&](__m256 xv) { return exp2(_mm256_mul_ps(_mm256_sub_ps(xv, vM), vc2)); };
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= full; i += 16) {
      const __m256 e0 = ex(load8(xc + i)), e1 = ex(load8(xc + i + 8));
      store8(xc + i, e0), store8(xc + i + 8, e1);
      s0 = _mm256_add_ps(s0, e0), s1 = _mm256_add_ps(s1, e1);
    }
    if (i < full) {
      const __m256 e = ex(load8(xc + i));
      store8(xc + i, e), s0 = _mm256_add_ps(s0, e);
    }
    if (full < len) {
      const __m256 e = ex(load_tail(xc + full, len - full, -INFINITY));
      store_tail(xc + full, len - full, e), s1 = _mm256_add_ps(s1, e);
    }
    if (M != -INFINITY && M != Mn) S *= std::exp(M - double(Mn));  // the max grew: rescale the running sum
    S += hsum_d(_mm256_add_ps(s0, s1));
    M = Mn;
  }
  for (int64_t c = 0, k = 0; c < V; c += kChunk, ++k) {
    // p = e e^(M_c - M) / S; the gradient of scale * log p[target] is scale * (onehot - p)
    const float f = chunk_max[k] == -INFINITY ? 0.f : float(-scale * std::exp(double(chunk_max[k]) - M) / S);
    const __m256 vf = _mm256_set1_ps(f);
    float* xc = x + c;
    const int64_t len = std::min(kChunk, V - c), full = len & ~int64_t(7);
    int64_t i = 0;
    for (; i < full; i += 8) store8(xc + i, _mm256_mul_ps(load8(xc + i), vf));
    if (full < len) store_tail(xc + full, len - full, _mm256_mul_ps(load_tail(xc + full, len - full, 0.f), vf));
  }
  x[target] += float(scale);
  row_max = float(M);
  return std::log(S);
}
#endif

template <class T, bool kMean>
RowStats row_stats(const T* x, int64_t V, double inv_t) {
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) return row_stats_avx2<T, kMean>(x, V, inv_t);
#endif
  return row_stats_scalar<T>(x, V, inv_t);
}

template <class T>
void fwd_rows(const TokenLogprobsFwdParams& p, int64_t r0, int64_t r1, std::atomic<int64_t>& bad) {
  using acc = acc_t<T>;
  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t n = r0; n < r1; ++n) {
    const T* x = logits + p.row_offset[n];  // (V,)
    const RowStats st = p.entropy ? row_stats<T, true>(x, p.V, p.inv_temperature)
                                  : row_stats<T, false>(x, p.V, p.inv_temperature);
    const int64_t t = p.targets[n];
    double lp = std::numeric_limits<double>::quiet_NaN();
    if (t >= 0 && t < p.V) {
      // log p <= 0 and H >= 0 hold by construction up to the last rounding, which the clamps remove
      // (std::min / std::max keep a NaN: an all -inf row stays NaN, as in log_softmax)
      lp = std::min((double(to_acc(x[t])) - st.M) * p.inv_temperature - st.log_s, 0.0);
    } else {  // keep the first bad row; the caller raises
      int64_t seen = bad.load();
      while ((seen < 0 || n < seen) && !bad.compare_exchange_weak(seen, n)) {}
    }
    static_cast<T*>(p.logprobs)[n] = from_acc<T>(acc(lp));
    p.lse[2 * n] = st.M;
    p.lse[2 * n + 1] = st.log_s;
    if (p.entropy) {
      static_cast<T*>(p.entropy)[n] = from_acc<T>(acc(std::max(st.log_s - st.mean_d, 0.0)));
      p.mean_scaled[n] = st.mean_d;
    }
  }
}

template <class T>
void bwd_rows(const TokenLogprobsBwdParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<T>;
  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t n = r0; n < r1; ++n) {
    const T* x = logits + p.row_offset[n];        // (V,)
    T* dx = static_cast<T*>(p.d_logits) + n * p.V;  // (V,)
    const acc g_lp = p.grad_logprobs ? to_acc(static_cast<const T*>(p.grad_logprobs)[n]) : acc(0);
    const acc g_h = p.grad_entropy ? to_acc(static_cast<const T*>(p.grad_entropy)[n]) : acc(0);
    const RowStats st{p.lse[2 * n], p.lse[2 * n + 1], p.grad_entropy ? p.mean_scaled[n] : 0.0};
    const int64_t t = std::clamp<int64_t>(p.targets[n], 0, p.V - 1);  // validated by the forward
#if defined(FR_HAVE_AVX2)
    if constexpr (!std::is_same_v<T, double>) {
      const double inv_t = p.inv_temperature;
      if (p.grad_entropy) row_grad_avx2<T, true>(x, dx, p.V, inv_t, st, g_lp, g_h, t);
      else row_grad_avx2<T, false>(x, dx, p.V, inv_t, st, g_lp, g_h, t);
      continue;
    }
#endif
    row_grad_scalar<T>(x, dx, p.V, p.inv_temperature, st, g_lp, g_h, t);
  }
}

template <class T>
void grad_rows(const TokenLogprobsGradParams& p, int64_t r0, int64_t r1) {
  using acc = acc_t<T>;
#if defined(FR_HAVE_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    std::vector<float> chunk_max(size_t((p.V + kChunk - 1) / kChunk));
    for (int64_t n = r0; n < r1; ++n) {
      float* x = static_cast<float*>(p.logits) + n * p.V;  // (V,) logits in, gradient out
      const int64_t t = p.targets[n];
      const float xt = x[t];
      float row_max = 0.f;
      const double log_s = row_grad_inplace_f32(x, p.V, p.scale, t, chunk_max.data(), row_max);
      static_cast<float*>(p.logprobs)[n] = float(double(xt - row_max) - log_s);  // xt - row_max: exact
    }
    return;
  }
#endif
  for (int64_t n = r0; n < r1; ++n) {
    T* x = static_cast<T*>(p.logits) + n * p.V;  // (V,) logits in, gradient out
    const RowStats st = row_stats<T, false>(x, p.V, 1.0);
    const int64_t t = p.targets[n];
    static_cast<T*>(p.logprobs)[n] = from_acc<T>(acc(std::min(double(to_acc(x[t])) - st.M - st.log_s, 0.0)));
#if defined(FR_HAVE_AVX2)
    if constexpr (!std::is_same_v<T, double>) {
      row_grad_avx2<T, false>(x, x, p.V, 1.0, st, float(p.scale), 0.f, t);
      continue;
    }
#endif
    // elementwise, so in place is safe
    row_grad_scalar<T>(x, x, p.V, 1.0, st, p.scale, 0.0, t);
  }
}

// Rows of small V are cheap: batch them so a task has at least ~32k elements.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace

void token_logprobs_fwd_cpu(const TokenLogprobsFwdParams& p) {
  std::atomic<int64_t> bad{-1};
  FR_DISPATCH_FLOAT(p.dtype, parallel_for(0, p.N, row_grain(p.V), [&](int64_t r0, int64_t r1) {
    fwd_rows<scalar_t>(p, r0, r1, bad);
  }));
  *p.bad_row = bad.load();
}

void token_logprobs_bwd_cpu(const TokenLogprobsBwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, parallel_for(0, p.N, row_grain(p.V), [&](int64_t r0, int64_t r1) {
    bwd_rows<scalar_t>(p, r0, r1);
  }));
}

void token_logprobs_grad_cpu(const TokenLogprobsGradParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, parallel_for(0, p.N, row_grain(p.V), [&](int64_t r0, int64_t r1) {
    grad_rows<scalar_t>(p, r0, r1);
  }));
}

}  // namespace fr::FR_ISA_NS
