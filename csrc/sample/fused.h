// Pass 1 and the softmax sum in one read of the row, for rows that need no stored e (greedy, small
// top-k): the row's DRAM latency then hides under the exp work instead of adding to it. Each SIMD lane
// keeps its own running max and sum of 2^((x - lane max) * c); a lane's sum is rescaled (in double)
// when its max rises, which happens ~ln(V / 8) times per lane, and the lanes are merged at the end.
// Included by sample.cpp only, inside its ISA namespace.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "sample/passes.h"

namespace fr::FR_ISA_NS::sampling {

template <class T> struct ScanSum : Scan<T> {
  double Z;  // sum over the row of 2^((x - m) * c)
};

#if defined(FR_HAVE_AVX2)
// Lanes whose max rose (bits of `rose`) get their sum scaled by 2^((old max - new max) * c).
inline void rescale(__m256d& z_lo, __m256d& z_hi, __m256 m_old, __m256 m_new, float c, unsigned rose) {
  alignas(32) double z[8];
  alignas(32) float a[8], b[8];
  _mm256_store_pd(z, z_lo);
  _mm256_store_pd(z + 4, z_hi);
  _mm256_store_ps(a, m_old);
  _mm256_store_ps(b, m_new);
  for (; rose; rose &= rose - 1) {
    const int l = __builtin_ctz(rose);
    z[l] *= std::exp2((double(a[l]) - double(b[l])) * double(c));
  }
  z_lo = _mm256_load_pd(z);
  z_hi = _mm256_load_pd(z + 4);
}

inline ScanSum<float> scan_softmax_avx2(const float* x, int64_t V, int64_t k, float c, std::vector<Cand<float>>& cand) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const size_t cap = size_t(2 * k + 256);
  cand.clear();
  if (k) cand.reserve(cap + kBlock);
  float t = -inf;  // top-k: the k-th best logit so far (see scan_row)
  int64_t tied = 0;
  // Lane maxima start at the lowest finite float, not -inf, so that -inf logits give 2^-inf = 0, not NaN.
  __m256 vm = _mm256_set1_ps(-FLT_MAX), vnan = _mm256_setzero_ps(), vinf = _mm256_setzero_ps();
  __m256d z_lo = _mm256_setzero_pd(), z_hi = z_lo;  // per-lane sums, lanes 0-3 and 4-7
  const __m256 vc = _mm256_set1_ps(c), pinfv = _mm256_set1_ps(inf);
  int64_t i = 0;
  for (; i + kBlock <= V; i += kBlock) {
    const __m256 vt = _mm256_set1_ps(t);
    __m256 cm = vm, ge = _mm256_setzero_ps();
    for (int64_t j = i; j < i + kBlock; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      cm = _mm256_max_ps(v, cm);  // a NaN v leaves cm as it was; NaN is flagged below
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vinf = _mm256_or_ps(vinf, _mm256_cmp_ps(v, pinfv, _CMP_EQ_OQ));
      ge = _mm256_or_ps(ge, _mm256_cmp_ps(v, vt, _CMP_GE_OQ));
    }
    if (const unsigned rose = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(cm, vm, _CMP_GT_OQ))))
      rescale(z_lo, z_hi, vm, cm, c, rose);
    vm = cm;
    __m256 a = _mm256_setzero_ps();  // float over one chunk, then double
    for (int64_t j = i; j < i + kBlock; j += 8)
      a = _mm256_add_ps(a, exp2_neg(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vc)));
    z_lo = _mm256_add_pd(z_lo, lo_pd(a));
    z_hi = _mm256_add_pd(z_hi, hi_pd(a));
    if (k && _mm256_movemask_ps(ge)) {
      push_chunk(x, i, t, cand, tied);
      if (cand.size() >= cap) t = keep_top_k(cand, k, t, tied);
    }
  }
  alignas(32) float ml[8];
  alignas(32) double zl[8];
  _mm256_store_ps(ml, vm);
  _mm256_store_pd(zl, z_lo);
  _mm256_store_pd(zl + 4, z_hi);
  float m = *std::max_element(ml, ml + 8);
  double Z = 0;
  for (int l = 0; l < 8; ++l)
    if (zl[l] > 0) Z += zl[l] * std::exp2((double(ml[l]) - double(m)) * double(c));
  bool nan = _mm256_movemask_ps(vnan) != 0, pinf = _mm256_movemask_ps(vinf) != 0;
  for (; i < V; ++i) {  // the last V % 64 tokens
    const float v = x[i];
    nan |= v != v;
    pinf |= v == inf;
    if (v > m) {
      Z *= std::exp2((double(m) - double(v)) * double(c));
      m = v;
    }
    Z += double(exp2_neg((v - m) * c));
    if (k && v > t) {
      cand.push_back({v, 0.0f, i});
      if (cand.size() >= cap) t = keep_top_k(cand, k, t, tied);
    } else if (k && v == t) {
      ++tied;
    }
  }
  if (m == -FLT_MAX && std::none_of(x, x + V, [](float v) { return v > -inf; })) m = -inf;  // all -inf
  float vk = -inf;
  if (k && int64_t(cand.size()) >= k) vk = keep_top_k(cand, k, t, tied);
  return {{m, nan, pinf, vk, tied}, Z};
}
#endif

// k > 0: also the top-k candidates, as scan_row. Without AVX2: scan_row, then the softmax sum.
template <class T> ScanSum<T> scan_softmax(const T* x, int64_t V, int64_t k, T c, std::vector<Cand<T>>& cand) {
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) return scan_softmax_avx2(x, V, k, c, cand);
#endif
  const Scan<T> r = scan_row(x, V, k, cand);
  double Z = 0;
  if (!r.nan && !r.pinf && r.m > -std::numeric_limits<T>::infinity())
    Z = softmax_pass<false, false>(x, V, r.m, c, r.vk, r.m, (T*)nullptr, nullptr, nullptr).Z;
  return {r, Z};
}

}  // namespace fr::FR_ISA_NS::sampling
