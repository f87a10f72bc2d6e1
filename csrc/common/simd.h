// Vector math shared by the kernels: 2^x and e^x, loads and stores of every storage dtype as 8 fp32
// lanes, and horizontal reductions. Included from kernel sources only, so it is compiled once per ISA
// like them (namespace fr::FR_ISA_NS::simd). The AVX2 build has the intrinsics; scalar functions exist
// in both builds.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#if defined(FR_HAVE_AVX2)
#include <immintrin.h>
#endif

namespace fr::FR_ISA_NS::simd {

// ---- 2^x for x <= 127 (the kernels pass x = score - max <= 0) -----------------------------------
// x = n + f with n = round(x) and f = x - n exact in [-1/2, 1/2]; 2^f by a degree-6 polynomial (a
// minimax fit of the relative error, p(0) = 1; <= 0.95 ulp, measured against exp2 in double); 2^n
// built in the exponent bits. Adding 1.5 * 2^23 + 127 rounds x to the nearest integer (ties to even)
// and leaves the biased exponent n + 127 in the low bits, so the reduction costs two adds; x is
// clamped at -127, where that exponent is 0 and the result exactly 0: -inf (a masked score) gives 0,
// x < -126.5 flushes to 0. NaN stays NaN. In the AVX2 build the scalar version performs the same
// operations as one vector lane and returns bit-identical results (the sampler relies on it); the
// baseline build, which has no FMA, uses std::exp2.
constexpr float kExp2Lo = -127.0f;
constexpr float kExp2Magic = 12583039.0f;  // 1.5 * 2^23 + 127
constexpr float kP1 = 0.6931471824645996f, kP2 = 0.24022647738456726f, kP3 = 0.055503323674201965f;
constexpr float kP4 = 0.009618437848985195f, kP5 = 0.0013398876180872321f, kP6 = 0.00015353357593994588f;

#if defined(FR_HAVE_AVX2)
inline __m256 exp2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExp2Lo), x);  // max(lo, NaN) is NaN
  const __m256 magic = _mm256_set1_ps(kExp2Magic);
  const __m256 t = _mm256_add_ps(x, magic);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP6), f, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}

inline float exp2(float x) {  // one lane of the vector version, operation for operation
  x = kExp2Lo > x ? kExp2Lo : x;  // _mm256_max_ps(lo, x)
  const float t = x + kExp2Magic;
  const float f = x - (t - kExp2Magic);
  float p = std::fma(kP6, f, kP5);
  p = std::fma(p, f, kP4);
  p = std::fma(p, f, kP3);
  p = std::fma(p, f, kP2);
  p = std::fma(p, f, kP1);
  p = std::fma(p, f, 1.0f);
  return p * bits_to_float(float_to_bits(t) << 23);
}
#else
inline float exp2(float x) { return std::exp2(x); }
#endif
inline double exp2(double x) { return std::exp2(x); }

#if defined(FR_HAVE_AVX2)
// ---- e^x over the whole fp32 range (ppo_loss's ratio) ------------------------------------------
// x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), a degree-7 polynomial for e^r (the classic
// Cephes expf coefficients), then scale by 2^n in the exponent bits. Results below FLT_MIN flush to
// exactly 0 (so -inf -> 0), x > 88 gives exp(88); NaN stays NaN. Not exp2(x log2 e): rounding x log2 e
// would cost up to |x| * 2^-24 of relative error (~70 ulp at x = -80).
inline __m256 exp(__m256 x) {
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

// ---- 8 elements of a storage dtype as fp32 lanes, and back -------------------------------------
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {  // bf16 is the top half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
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

// Up to 8 elements through a stack buffer, so row tails take the same vector math; lanes >= n hold pad.
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

// ---- horizontal reductions ---------------------------------------------------------------------
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
inline double hsum(__m256d a) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
// fp32 lanes 0-3 / 4-7 widened to double, for sums that must not lose bits.
inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
// The 8 lanes summed in double.
inline double hsum_d(__m256 v) { return hsum(_mm256_add_pd(lo_pd(v), hi_pd(v))); }
#endif  // FR_HAVE_AVX2

}  // namespace fr::FR_ISA_NS::simd
