// The O(V) passes over one row of the sampler (included by sample.cpp only, inside its ISA namespace).
// Each pass has an AVX2 path for float rows and a scalar path for tails, double rows and the
// baseline build; the two give bit-identical results (same operations, same exp polynomial).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#if defined(FR_HAVE_AVX2)
#include <immintrin.h>
#endif

namespace fr::FR_ISA_NS::sampling {

constexpr int kBuckets = 2048;         // top-p histogram: bucket b holds d = (x - max) / T in (-(b+1)/16, -b/16]
constexpr float kBucketsPerNat = 16.f;  // 1/16 nat wide: probabilities within 6.5% of each other
constexpr int64_t kBlock = 64;          // inverse-CDF scan: allowed mass per block of 64 tokens

template <class T> struct Cand { T x; int64_t i; };  // a top-k candidate: logit and index

// Candidates are ranked by (x descending, index ascending): keys are unique, so the k-th key's x is
// the k-th largest logit counting ties, and a later token equal to the current k-th x never enters.
template <class T> inline bool better(const Cand<T>& a, const Cand<T>& b) {
  return a.x > b.x || (a.x == b.x && a.i < b.i);
}

// Keeps the k best candidates (unordered) and returns the k-th best logit.
template <class T> inline T keep_top_k(std::vector<Cand<T>>& c, int64_t k) {
  std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), better<T>);
  c.resize(size_t(k));
  return c[size_t(k - 1)].x;
}

// ---- exp(d) for d <= 0 (-inf gives 0) -------------------------------------------------------
// Cody-Waite reduction d = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-5 minimax polynomial for
// (e^r - 1 - r) / r^2: ~2 ulp. Below e^-87 (1.6e-38) the result is flushed to 0. exp(0) == 1 exactly.
#if defined(FR_HAVE_AVX2)
constexpr float kExpLo = -87.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline __m256 exp_neg(__m256 d) {
  const __m256 under = _mm256_cmp_ps(d, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
  __m256 x = _mm256_max_ps(d, _mm256_set1_ps(kExpLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 y = _mm256_set1_ps(kP0);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(scale)));
}

inline float exp_neg(float d) {  // the same operations, one lane
  if (d < kExpLo) return 0.0f;
  const float n = std::nearbyint(d * kLog2e);
  float x = std::fma(-n, kLn2Hi, d);
  x = std::fma(-n, kLn2Lo, x);
  float y = kP0;
  y = std::fma(y, x, kP1);
  y = std::fma(y, x, kP2);
  y = std::fma(y, x, kP3);
  y = std::fma(y, x, kP4);
  y = std::fma(y, x, kP5);
  y = std::fma(y, x * x, x + 1.0f);
  return y * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

inline double hsum(__m256d a) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
#else
inline float exp_neg(float d) { return std::exp(d); }
#endif
inline double exp_neg(double d) { return std::exp(d); }

template <class T> constexpr bool kVec =
#if defined(FR_HAVE_AVX2)
    std::is_same_v<T, float>;
#else
    false;
#endif

// ---- pass 1: max, NaN / +inf flags and top-k candidates ------------------------------------------
template <class T> struct Scan {
  T m;           // row max
  bool nan, pinf;
  T vk;          // k-th largest logit counting ties (-inf when fewer than k are finite)
};

// With k > 0, `cand` ends holding every token whose (x, index) key is among the k best (exactly k of
// them, or all finite tokens when there are fewer): a token enters only if it beats the k-th key so
// far, and the buffer is cut back to k when it reaches 2k + 256, so the pass stays O(V).
template <class T> Scan<T> scan_row(const T* x, int64_t V, int64_t k, std::vector<Cand<T>>& cand) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const size_t cap = size_t(2 * k + 256);
  cand.clear();
  if (k) cand.reserve(cap + 8);
  T m = -inf, t = -inf;
  bool nan = false, pinf = false;
  int64_t i = 0;
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) {
    __m256 vmax = _mm256_set1_ps(-inf), vnan = _mm256_setzero_ps(), vinf = _mm256_setzero_ps();
    __m256 vt = _mm256_set1_ps(t);
    const __m256 pinfv = _mm256_set1_ps(inf);
    for (; i + 8 <= V; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      vmax = _mm256_max_ps(vmax, v);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vinf = _mm256_or_ps(vinf, _mm256_cmp_ps(v, pinfv, _CMP_EQ_OQ));
      if (!k) continue;
      unsigned bits = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GT_OQ)));
      if (!bits) continue;
      for (; bits; bits &= bits - 1) {
        const int j = __builtin_ctz(bits);
        cand.push_back({x[i + j], i + j});
      }
      if (cand.size() >= cap) vt = _mm256_set1_ps(t = keep_top_k(cand, k));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    for (float l : lanes) m = l > m ? l : m;
    nan = _mm256_movemask_ps(vnan) != 0;
    pinf = _mm256_movemask_ps(vinf) != 0;
  }
#endif
  for (; i < V; ++i) {
    const T v = x[i];
    nan |= v != v;
    pinf |= v == inf;
    m = v > m ? v : m;
    if (k && v > t) {
      cand.push_back({v, i});
      if (cand.size() >= cap) t = keep_top_k(cand, k);
    }
  }
  T vk = -inf;
  if (k && int64_t(cand.size()) >= k) vk = keep_top_k(cand, k);
  return {m, nan, pinf, vk};
}

// ---- pass 2: e_i = exp((x_i - m) * invT) into e, their sums, the top-p histogram --------------------
struct Sums {
  double Z = 0;      // sum of e over the row (the unfiltered softmax's denominator)
  double Zk = 0;     // sum of e over top-k survivors x >= vk (kTopK only)
  int64_t n_ge = 0;  // number of survivors x >= vk (kTopK only)
};

// kHist: every survivor with d >= d_cut adds its e to hist[bucket] and records the bucket in `bucket`
// (kBuckets marks tokens left out), for the top-p boundary search.
template <bool kTopK, bool kHist, class T>
Sums softmax_pass(const T* x, int64_t V, T m, T invT, T vk, T d_cut, T* e, uint16_t* bucket, double* hist) {
  Sums s;
  int64_t i = 0;
  auto bucket_of = [](T d) { return int32_t(std::min(d * T(-kBucketsPerNat), T(kBuckets - 1))); };
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) {
    __m256d z0 = _mm256_setzero_pd(), z1 = z0, zk0 = z0, zk1 = z0;
    __m256i nge = _mm256_setzero_si256();
    const __m256 vm = _mm256_set1_ps(m), vinv = _mm256_set1_ps(invT), vvk = _mm256_set1_ps(vk);
    const __m256 vcut = _mm256_set1_ps(d_cut), vneg = _mm256_set1_ps(-kBucketsPerNat);
    const __m256 vtop = _mm256_set1_ps(float(kBuckets - 1));
    const __m256i none = _mm256_set1_epi32(kBuckets);
    for (; i + 8 <= V; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 d = _mm256_mul_ps(_mm256_sub_ps(v, vm), vinv);
      const __m256 ev = exp_neg(d);
      _mm256_storeu_ps(e + i, ev);
      z0 = _mm256_add_pd(z0, lo_pd(ev));
      z1 = _mm256_add_pd(z1, hi_pd(ev));
      __m256 ge = _mm256_setzero_ps();
      if constexpr (kTopK) {
        ge = _mm256_cmp_ps(v, vvk, _CMP_GE_OQ);
        const __m256 evk = _mm256_and_ps(ev, ge);
        zk0 = _mm256_add_pd(zk0, lo_pd(evk));
        zk1 = _mm256_add_pd(zk1, hi_pd(evk));
        nge = _mm256_sub_epi32(nge, _mm256_castps_si256(ge));
      }
      if constexpr (kHist) {
        __m256 sel = _mm256_cmp_ps(d, vcut, _CMP_GE_OQ);
        if constexpr (kTopK) sel = _mm256_and_ps(sel, ge);
        __m256i b = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_mul_ps(d, vneg), vtop));
        b = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(none), _mm256_castsi256_ps(b), sel));
        alignas(32) int32_t bl[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(bl), b);
        const __m256i b16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);  // 8 x u16 in lane 0
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bucket + i), _mm256_castsi256_si128(b16));
        for (unsigned bits = unsigned(_mm256_movemask_ps(sel)); bits; bits &= bits - 1) {
          const int j = __builtin_ctz(bits);
          hist[bl[j]] += double(e[i + j]);
        }
      }
    }
    s.Z = hsum(_mm256_add_pd(z0, z1));
    s.Zk = hsum(_mm256_add_pd(zk0, zk1));
    alignas(32) int32_t c[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), nge);
    for (int32_t n : c) s.n_ge += n;
  }
#endif
  for (; i < V; ++i) {
    const T d = (x[i] - m) * invT;
    const T ev = exp_neg(d);
    e[i] = ev;
    s.Z += double(ev);
    const bool ge = !kTopK || x[i] >= vk;
    if (kTopK && ge) {
      s.Zk += double(ev);
      ++s.n_ge;
    }
    if constexpr (kHist) {
      const bool sel = ge && d >= d_cut;
      bucket[i] = uint16_t(sel ? bucket_of(d) : kBuckets);
      if (sel) hist[bucket_of(d)] += double(ev);
    }
  }
  if (!kTopK) s.Zk = s.Z, s.n_ge = V;
  return s;
}

// ---- the tokens of one histogram bucket ------------------------------------------------------------
template <class T>
void collect_bucket(const T* x, const uint16_t* bucket, int64_t V, int b, std::vector<Cand<T>>& out) {
  out.clear();
  int64_t i = 0;
#if defined(FR_HAVE_AVX2)
  const __m256i vb = _mm256_set1_epi16(int16_t(b));
  for (; i + 16 <= V; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + i));
    // two mask bits per 16-bit lane: keep the even ones
    for (unsigned bits = unsigned(_mm256_movemask_epi8(_mm256_cmpeq_epi16(v, vb))) & 0x55555555u; bits;
         bits &= bits - 1)
      out.push_back({x[i + __builtin_ctz(bits) / 2], i + __builtin_ctz(bits) / 2});
  }
#endif
  for (; i < V; ++i)
    if (bucket[i] == b) out.push_back({x[i], i});
}

// ---- inverse CDF over the allowed set {x >= tau, e >= thr}, in index order ---------------------------
// One pass stores the allowed mass of each 64-token block; the block holding u * total is then
// scanned token by token. If rounding leaves the target unreached, the last allowed token with
// mass is returned, so the token is always allowed.
template <class T>
int64_t sample_scan(const T* x, const T* e, int64_t V, T tau, T thr, double u, std::vector<double>& block) {
  const int64_t nb = (V + kBlock - 1) / kBlock;
  block.resize(size_t(nb));
  auto allowed = [&](int64_t i) { return x[i] >= tau && e[i] >= thr; };
  double total = 0;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t lo = bi * kBlock, hi = std::min(V, lo + kBlock);
    double sum = 0;
#if defined(FR_HAVE_AVX2)
    if constexpr (kVec<T>) {
      if (hi - lo == kBlock) {
        __m256d a0 = _mm256_setzero_pd(), a1 = a0;
        const __m256 vtau = _mm256_set1_ps(tau), vthr = _mm256_set1_ps(thr);
        for (int64_t i = lo; i < hi; i += 8) {
          const __m256 ev = _mm256_loadu_ps(e + i);
          const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vtau, _CMP_GE_OQ),
                                          _mm256_cmp_ps(ev, vthr, _CMP_GE_OQ));
          const __m256 w = _mm256_and_ps(ev, ok);
          a0 = _mm256_add_pd(a0, lo_pd(w));
          a1 = _mm256_add_pd(a1, hi_pd(w));
        }
        block[size_t(bi)] = hsum(_mm256_add_pd(a0, a1));
        total += block[size_t(bi)];
        continue;
      }
    }
#endif
    for (int64_t i = lo; i < hi; ++i) sum += allowed(i) ? double(e[i]) : 0.0;
    block[size_t(bi)] = sum;
    total += sum;
  }
  const double target = u * total;
  double cum = 0;
  for (int64_t bi = 0; bi < nb; ++bi) {
    if (!(cum + block[size_t(bi)] > target)) {
      cum += block[size_t(bi)];
      continue;
    }
    const int64_t lo = bi * kBlock, hi = std::min(V, lo + kBlock);
    for (int64_t i = lo; i < hi; ++i) {
      if (!allowed(i)) continue;
      cum += double(e[i]);
      if (cum > target && e[i] > 0) return i;
    }
  }
  for (int64_t i = V - 1; i >= 0; --i)
    if (allowed(i) && e[i] > 0) return i;
  return 0;  // unreachable: the row max is always allowed and has mass 1
}

}  // namespace fr::FR_ISA_NS::sampling
