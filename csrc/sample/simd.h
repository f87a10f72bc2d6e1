// Vector math for the sampler (included by its headers only, inside the ISA namespace): e = 2^d2 with
// the same operations per lane in AVX2 and scalar code, so both give bit-identical results; reductions.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dtype.h"
#if defined(FR_HAVE_AVX2)
#include <immintrin.h>
#endif

namespace fr::FR_ISA_NS::sampling {

// ---- e = 2^d2 for d2 = (x - max) * log2(e) / T <= 0 (-inf gives 0) -----------------------------------
// 2^d2 = 2^n * 2^f with n = round(d2), |f| <= 1/2, and a degree-6 polynomial for 2^f (fitted to minimax
// relative error, 1.3 ulp, monotone, p(0) = 1 exactly). Base 2 saves the Cody-Waite reduction: six FMAs
// and two multiplies per 8 tokens on the FMA pipes. Below 2^-125 (2.4e-38) the result is flushed to 0.
#if defined(FR_HAVE_AVX2)
constexpr float kExp2Lo = -125.0f;
constexpr float kQ1 = 0.6931471824645996f, kQ2 = 0.24022647738456726f, kQ3 = 0.055503323674201965f;
constexpr float kQ4 = 0.009618437848985195f, kQ5 = 0.0013398876180872321f, kQ6 = 0.00015353357593994588f;

inline __m256 exp2_neg(__m256 d2) {
  const __m256 under = _mm256_cmp_ps(d2, _mm256_set1_ps(kExp2Lo), _CMP_LT_OQ);
  const __m256 x = _mm256_max_ps(d2, _mm256_set1_ps(kExp2Lo));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(kQ6), f, _mm256_set1_ps(kQ5));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kQ4));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kQ3));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kQ2));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kQ1));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(scale)));
}

inline float exp2_neg(float d2) {  // the same operations, one lane: bit-identical results
  if (d2 < kExp2Lo) return 0.0f;
  const float n = std::nearbyint(d2), f = d2 - n;
  float y = std::fma(kQ6, f, kQ5);
  y = std::fma(y, f, kQ4);
  y = std::fma(y, f, kQ3);
  y = std::fma(y, f, kQ2);
  y = std::fma(y, f, kQ1);
  y = std::fma(y, f, 1.0f);
  return y * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

inline double hsum(__m256d a) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
#else
inline float exp2_neg(float d2) { return std::exp2(d2); }
#endif
inline double exp2_neg(double d2) { return std::exp2(d2); }

// floor(log2(max(z, 1))) from the exponent bits.
inline int floor_log2(double z) {
  if (!(z >= 2.0)) return 0;
  uint64_t u;
  std::memcpy(&u, &z, 8);
  return int((u >> 52) & 0x7ff) - 1023;
}

template <class T> constexpr bool kVec =
#if defined(FR_HAVE_AVX2)
    std::is_same_v<T, float>;
#else
    false;
#endif

}  // namespace fr::FR_ISA_NS::sampling
