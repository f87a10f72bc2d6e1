// Drawing the token: inverse CDF over the allowed tokens in index order with one Philox uniform u
// (included by sample.cpp only, inside its ISA namespace).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "sample/passes.h"

namespace fr::FR_ISA_NS::sampling {

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

// ---- inverse CDF over the whole row, e recomputed on the fly ------------------------------------------
// Unfiltered sampling: target = u * Z with Z the row's sum from the fused pass; blocks of 64 are skipped
// by their (vector) sums until the one holding the target, which is scanned token by token; half a
// pass on average. If rounding leaves the target unreached, the last token with mass is returned.
template <class T> int64_t sample_plain(const T* x, int64_t V, T m, T c, double Z, double u) {
  const double target = u * Z;
  double cum = 0;
  int64_t i = 0, last = -1;
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) {
    const __m256 vm = _mm256_set1_ps(m), vc = _mm256_set1_ps(c);
    for (; i + kBlock <= V; i += kBlock) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t j = i; j < i + kBlock; j += 8)
        a = _mm256_add_ps(a, exp2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vc)));
      const double block = hsum(_mm256_add_pd(lo_pd(a), hi_pd(a)));
      if (cum + block > target) break;
      cum += block;
    }
  }
#endif
  for (; i < V; ++i) {
    const T e = exp2((x[i] - m) * c);
    if (e == 0) continue;
    cum += double(e);
    last = i;
    if (cum > target) return i;
  }
  for (int64_t j = V - 1; last < 0 && j >= 0; --j)  // target unreached before the last block
    if (exp2((x[j] - m) * c) > 0) last = j;
  return last;
}

}  // namespace fr::FR_ISA_NS::sampling
