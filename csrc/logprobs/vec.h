// 8-lane fp32 helpers for the AVX2 build of the logprobs and ppo_loss kernels: loads that
// widen bf16/fp16 to fp32, stores that round back, and exp / exp2 accurate to about 1 ulp.
// Only included from kernel .cpp files, and only under FR_HAVE_AVX2.
#pragma once
#if defined(FR_HAVE_AVX2)
#include <immintrin.h>

#include <cfloat>
#include <cstdint>

#include "common/dtype.h"

namespace fr::FR_ISA_NS::vec {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {  // bf16 is the top half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const uint8_t* p) {  // a bool mask (bytes 0 / 1) as 0.0 / 1.0
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16_t* p, __m256 v) {  // round to nearest even, NaN stays NaN
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(f16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float as_float(uint8_t v) { return float(v); }
template <class T> inline float as_float(T v) { return to_acc(v); }

// Up to 8 elements through a stack buffer, so row tails take the same vector math.
template <class T>
inline __m256 load_tail(const T* p, int64_t n, float pad) {
  alignas(32) float buf[8];
  for (int64_t i = 0; i < 8; ++i) buf[i] = i < n ? as_float(p[i]) : pad;
  return _mm256_load_ps(buf);
}
template <class T>
inline void store_tail(T* p, int64_t n, __m256 v) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = from_acc<T>(buf[i]);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
// Sum of the 8 lanes in double: chunk partials are combined in double by the callers.
inline double hsum_d(__m256 v) {
  const __m256d a = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                  _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// exp(x) for fp32 lanes (ppo_loss's ratio): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of
// ln2), a degree-7 minimax polynomial for e^r (the classic Cephes expf coefficients), then scale by
// 2^n built in the exponent bits. Results below FLT_MIN flush to exactly 0 (so -inf -> 0), x > 88
// gives exp(88); NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365448f);  // ln(FLT_MIN)
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.0f), x));  // n in [-126, 127]; NaN passes
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// 2^z for z <= ~0 (z = (x - max) * log2(e) / T in the logprobs kernels): 2^z = 2^n 2^f with n =
// round(z) and f = z - n exact in [-0.5, 0.5]; 2^f by a degree-6 polynomial (a Lawson-iterated
// least-squares fit on Chebyshev nodes, 1.3 ulp in fp32 Horner form). Three operations cheaper
// than exp8 per lane. z < -126 (including -inf) gives exactly 0; NaN stays NaN.
inline __m256 exp2_8_nonpos(__m256 z) {
  const __m256 tiny = _mm256_cmp_ps(z, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  const __m256 n = _mm256_round_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(z, n);
  __m256 p = _mm256_set1_ps(1.5345810970757157e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399930903688073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489071726799e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642129898e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

}  // namespace fr::FR_ISA_NS::vec
#endif
