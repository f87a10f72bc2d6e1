// token_logprobs: one task per block of rows. With y = x / T and p = softmax(y):
//   logprob = y[target] - lse,  entropy = lse - E_p[y],  lse = log sum exp y,
//   d x_i = (g_lp * (1[i == target] - p_i) - g_H * p_i * (y_i - E_p[y])) / T.
// The forward reads each row from memory once: it walks the row in L1-sized chunks, takes the
// chunk's max, then accumulates sum e^(y - M) and sum e^(y - M) (y - M) against the running max
// M, rescaling the running sums when M grows (online softmax, Milakov & Gimelshein 2018,
// arXiv 1805.02867). Working relative to M keeps the entropy free of cancellation.
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

struct RowStats {
  double lse;      // log sum exp y
  double mean;     // E_p[y]
  double entropy;  // lse - E_p[y], computed without cancellation
};

// Running sums relative to the row max M: s = sum e^(y - M), t = sum e^(y - M) (y - M).
RowStats finish(double M, double s, double t) {
  return {M + std::log(s), M + t / s, std::log(s) - t / s};
}

// Portable path (baseline ISA and float64): two passes over the row, math in acc_t.
template <class T>
RowStats row_stats_scalar(const T* x, int64_t V, acc_t<T> inv_t) {
  using acc = acc_t<T>;
  acc M = -std::numeric_limits<acc>::infinity();
  for (int64_t i = 0; i < V; ++i) M = std::max(M, to_acc(x[i]) * inv_t);
  double s = 0, t = 0;
  for (int64_t i = 0; i < V; ++i) {
    const acc d = to_acc(x[i]) * inv_t - M;
    const acc e = std::exp(d);
    s += e;
    if (e > 0) t += e * d;  // e == 0 where y == -inf: no 0 * inf
  }
  return finish(M, s, t);
}

template <class T>
void row_grad_scalar(const T* x, T* dx, int64_t V, acc_t<T> inv_t, acc_t<T> lse, acc_t<T> mean,
                     acc_t<T> g_lp, acc_t<T> g_h, int64_t target) {
  using acc = acc_t<T>;
  for (int64_t i = 0; i < V; ++i) {
    const acc y = to_acc(x[i]) * inv_t, p = std::exp(y - lse);
    const acc pd = p > 0 ? p * (y - mean) : acc(0);
    dx[i] = from_acc<T>(acc(-(g_lp * p + g_h * pd) * inv_t + (i == target ? g_lp * inv_t : acc(0))));
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

// As row_stats_scalar, in base-2 units: z = x log2(e) / T, so each lane needs 2^(z - M) only.
template <class T, bool kMean>
RowStats row_stats_avx2(const T* x, int64_t V, double inv_t) {
  using namespace simd;
  const float c2 = float(inv_t * kLog2e);
  const __m256 vc2 = _mm256_set1_ps(c2), lowest = _mm256_set1_ps(-FLT_MAX);
  double M = -INFINITY, S = 0, Tm = 0;  // running max of z, sum 2^(z - M), sum 2^(z - M) (z - M)
  for (int64_t c = 0; c < V; c += kChunk) {
    const T* xc = x + c;
    const int64_t len = std::min(kChunk, V - c), full = len & ~int64_t(7);
    const float Mn = std::max(float(M), block_max(xc, len) * c2);  // x -> x c2 is monotone
    if (Mn == -INFINITY) continue;  // all -inf so far: nothing to add
    const __m256 vM = _mm256_set1_ps(Mn);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, t0 = s0, t1 = s0;
    auto step = [&](__m256 xv, __m256& s, __m256& t) {
      const __m256 z = _mm256_fmsub_ps(xv, vc2, vM), e = exp2(z);
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
    if (M != -INFINITY && M != Mn) {  // the max grew: move the running sums to the new max
      const double shift = M - Mn, a = std::exp2(shift);
      Tm = a * (Tm + shift * S);
      S *= a;
    }
    S += hsum_d(_mm256_add_ps(s0, s1));
    Tm += hsum_d(_mm256_add_ps(t0, t1));
    M = Mn;
  }
  // back to natural units: lse = ln2 M + ln S, E[y] = ln2 (M + Tm / S)
  return {kLn2 * M + std::log(S), kLn2 * (M + Tm / S), std::log(S) - kLn2 * Tm / S};
}

template <class T, bool kEnt>
void row_grad_avx2(const T* x, T* dx, int64_t V, double inv_t, double lse, float mean, float g_lp,
                   float g_h, int64_t target) {
  using namespace simd;
  const float inv_f = float(inv_t);
  const __m256 vinv = _mm256_set1_ps(inv_f), vmean = _mm256_set1_ps(mean);
  const __m256 vc2 = _mm256_set1_ps(float(inv_t * kLog2e)), vlse2 = _mm256_set1_ps(float(lse * kLog2e));
  const __m256 a = _mm256_set1_ps(-g_lp * inv_f), b = _mm256_set1_ps(-g_h * inv_f);
  const __m256 lowest = _mm256_set1_ps(-FLT_MAX);
  auto grad = [&](__m256 xv) {  // without the target's +g_lp / T; p = 2^((x / T - lse) log2 e)
    const __m256 p = exp2(_mm256_fmsub_ps(xv, vc2, vlse2));
    if (!kEnt) return _mm256_mul_ps(a, p);
    const __m256 pd = _mm256_mul_ps(p, _mm256_max_ps(_mm256_fmsub_ps(xv, vinv, vmean), lowest));
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
// e = 2^(z - M_c) in place (M_c the running max when chunk c was read) and sums them as
// row_stats_avx2 does; the second turns e into scale * (onehot - p) with p = e 2^(M_c - M) / S,
// one multiply per element. Returns the row's lse (natural units).
double row_grad_inplace_f32(float* x, int64_t V, double scale, int64_t target, float* chunk_max) {
  using namespace simd;
  const __m256 vc2 = _mm256_set1_ps(float(kLog2e));
  double M = -INFINITY, S = 0;
  for (int64_t c = 0, k = 0; c < V; c += kChunk, ++k) {
    float* xc = x + c;
    const int64_t len = std::min(kChunk, V - c), full = len & ~int64_t(7);
    const float Mn = std::max(float(M), block_max(xc, len) * float(kLog2e));
    chunk_max[k] = Mn;
    const __m256 vM = _mm256_set1_ps(Mn == -INFINITY ? 0.f : Mn);  // all -inf so far: e = 0 below
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= full; i += 16) {
      const __m256 e0 = exp2(_mm256_fmsub_ps(load8(xc + i), vc2, vM));
      const __m256 e1 = exp2(_mm256_fmsub_ps(load8(xc + i + 8), vc2, vM));
      store8(xc + i, e0), store8(xc + i + 8, e1);
      s0 = _mm256_add_ps(s0, e0), s1 = _mm256_add_ps(s1, e1);
    }
    if (i < full) {
      const __m256 e = exp2(_mm256_fmsub_ps(load8(xc + i), vc2, vM));
      store8(xc + i, e), s0 = _mm256_add_ps(s0, e);
    }
    if (full < len) {
      const __m256 e = exp2(_mm256_fmsub_ps(load_tail(xc + full, len - full, -INFINITY), vc2, vM));
      store_tail(xc + full, len - full, e), s1 = _mm256_add_ps(s1, e);
    }
    if (M != -INFINITY && M != Mn) S *= std::exp2(M - Mn);  // the max grew: rescale the running sum
    S += hsum_d(_mm256_add_ps(s0, s1));
    M = Mn;
  }
  for (int64_t c = 0, k = 0; c < V; c += kChunk, ++k) {
    // p = e 2^(M_c - M) / S; the gradient of scale * log p[target] is scale * (onehot - p)
    const float f = chunk_max[k] == -INFINITY ? 0.f : float(-scale * std::exp2(double(chunk_max[k]) - M) / S);
    const __m256 vf = _mm256_set1_ps(f);
    float* xc = x + c;
    const int64_t len = std::min(kChunk, V - c), full = len & ~int64_t(7);
    int64_t i = 0;
    for (; i < full; i += 8) store8(xc + i, _mm256_mul_ps(load8(xc + i), vf));
    if (full < len) store_tail(xc + full, len - full, _mm256_mul_ps(load_tail(xc + full, len - full, 0.f), vf));
  }
  x[target] += float(scale);
  return kLn2 * M + std::log(S);
}
#endif

template <class T, bool kMean>
RowStats row_stats(const T* x, int64_t V, double inv_t) {
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) return row_stats_avx2<T, kMean>(x, V, inv_t);
#endif
  return row_stats_scalar<T>(x, V, acc_t<T>(inv_t));
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
      lp = double(to_acc(x[t])) * p.inv_temperature - st.lse;
    } else {  // keep the first bad row; the caller raises
      int64_t seen = bad.load();
      while ((seen < 0 || n < seen) && !bad.compare_exchange_weak(seen, n)) {}
    }
    static_cast<T*>(p.logprobs)[n] = from_acc<T>(acc(lp));
    static_cast<acc*>(p.lse)[n] = acc(st.lse);
    if (p.entropy) {
      static_cast<T*>(p.entropy)[n] = from_acc<T>(acc(st.entropy));
      static_cast<acc*>(p.mean_scaled)[n] = acc(st.mean);
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
    const acc lse = static_cast<const acc*>(p.lse)[n];
    const acc mean = p.grad_entropy ? static_cast<const acc*>(p.mean_scaled)[n] : acc(0);
    const int64_t t = std::clamp<int64_t>(p.targets[n], 0, p.V - 1);  // validated by the forward
#if defined(FR_HAVE_AVX2)
    if constexpr (!std::is_same_v<T, double>) {
      const double inv_t = p.inv_temperature;
      if (p.grad_entropy) row_grad_avx2<T, true>(x, dx, p.V, inv_t, lse, mean, g_lp, g_h, t);
      else row_grad_avx2<T, false>(x, dx, p.V, inv_t, lse, mean, g_lp, g_h, t);
      continue;
    }
#endif
    row_grad_scalar<T>(x, dx, p.V, acc(p.inv_temperature), lse, mean, g_lp, g_h, t);
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
      const double xt = x[t];
      const double lse = row_grad_inplace_f32(x, p.V, p.scale, t, chunk_max.data());
      static_cast<float*>(p.logprobs)[n] = float(xt - lse);
    }
    return;
  }
#endif
  for (int64_t n = r0; n < r1; ++n) {
    T* x = static_cast<T*>(p.logits) + n * p.V;  // (V,) logits in, gradient out
    const RowStats st = row_stats<T, false>(x, p.V, 1.0);
    const int64_t t = p.targets[n];
    static_cast<T*>(p.logprobs)[n] = from_acc<T>(acc(double(to_acc(x[t])) - st.lse));
#if defined(FR_HAVE_AVX2)
    if constexpr (!std::is_same_v<T, double>) {
      row_grad_avx2<T, false>(x, x, p.V, 1.0, st.lse, 0.f, float(p.scale), 0.f, t);
      continue;
    }
#endif
    // elementwise, so in place is safe
    row_grad_scalar<T>(x, x, p.V, acc(1), acc(st.lse), acc(0), acc(p.scale), acc(0), t);
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
