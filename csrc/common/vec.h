// Blocks of 16 fp32 lanes for kernels written once for both vector builds: one zmm register in the
// AVX-512 build (fr::avx512), two ymm registers in the AVX2 build (fr::avx2). Lane i holds element i of
// the block in both, every operation is lane-wise IEEE (fused multiply-adds where written), and sums of
// the lanes reduce in one fixed tree, so the two builds give the same bits for the same input. Tails
// (n < 16 elements) load with zero padding and store only n lanes: masked in AVX-512, through a stack
// buffer in AVX2. Included from kernel sources only (namespace fr::FR_ISA_NS::vec).
#pragma once
#if defined(FR_HAVE_AVX2)
#include <immintrin.h>

#include <cstdint>

#include "common/simd.h"

namespace fr::FR_ISA_NS::vec {

constexpr int64_t W = 16;  // lanes of an F

#if defined(FR_HAVE_AVX512)
struct F { __m512 v; };

inline F set1(float a) { return {_mm512_set1_ps(a)}; }
inline F operator+(F a, F b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F operator-(F a, F b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F operator*(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F operator/(F a, F b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F fmadd(F a, F b, F c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }   // a b + c
inline F fnmadd(F a, F b, F c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a b
inline F max(F a, F b) { return {_mm512_max_ps(a.v, b.v)}; }  // b where either is NaN (as maxps)
inline F min(F a, F b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F or_bits(F a, F b) {
  return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a.v), _mm512_castps_si512(b.v)))};
}
// a where c >= 0 (ordered), else b
inline F select_ge0(F c, F a, F b) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(c.v, _mm512_setzero_ps(), _CMP_GE_OQ), b.v, a.v)};
}

inline F load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F widen_bf16(__m256i h) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))}; }
inline F load(const bf16_t* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline F load(const f16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }

inline __m256i narrow_bf16(F a) {  // round to nearest even, NaN stays NaN (as simd::store8)
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
inline __m256i narrow_f16(F a) { return _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void store(float* p, F a) { _mm512_storeu_ps(p, a.v); }
inline void store(bf16_t* p, F a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(a)); }
inline void store(f16_t* p, F a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_f16(a)); }

inline __mmask16 first(int64_t n) { return __mmask16((1u << n) - 1); }  // n in [0, 16)
inline F load_tail(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(first(n), p)}; }
inline F load_tail(const bf16_t* p, int64_t n) { return widen_bf16(_mm256_maskz_loadu_epi16(first(n), p)); }
inline F load_tail(const f16_t* p, int64_t n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p))}; }
inline void store_tail(float* p, int64_t n, F a) { _mm512_mask_storeu_ps(p, first(n), a.v); }
inline void store_tail(bf16_t* p, int64_t n, F a) { _mm256_mask_storeu_epi16(p, first(n), narrow_bf16(a)); }
inline void store_tail(f16_t* p, int64_t n, F a) { _mm256_mask_storeu_epi16(p, first(n), narrow_f16(a)); }

// Lanes 0-7 + lanes 8-15, then simd::hsum's tree over the 8 sums: the AVX2 build's order.
inline float hsum(F a) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1));
  return simd::hsum(_mm256_add_ps(_mm512_castps512_ps256(a.v), hi));
}

// e^x lane by lane: simd::exp's steps on 16 lanes (FLT_MIN underflows to 0, x > 88 gives e^88).
inline F exp(F a) {
  __m512 x = a.v;
  const __m512 lo = _mm512_set1_ps(-87.3365448f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(lo, _mm512_min_ps(_mm512_set1_ps(88.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_maskz_mul_ps(_knot_mask16(tiny), p, _mm512_castsi512_ps(e))};
}

#else  // AVX2: lanes 0-7 in lo, 8-15 in hi
struct F { __m256 lo, hi; };

inline F set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F operator+(F a, F b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F operator-(F a, F b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F operator*(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F operator/(F a, F b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline F fmadd(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F fnmadd(F a, F b, F c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline F max(F a, F b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F min(F a, F b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline F or_bits(F a, F b) { return {_mm256_or_ps(a.lo, b.lo), _mm256_or_ps(a.hi, b.hi)}; }
inline F select_ge0(F c, F a, F b) {
  const __m256 z = _mm256_setzero_ps();
  return {_mm256_blendv_ps(b.lo, a.lo, _mm256_cmp_ps(c.lo, z, _CMP_GE_OQ)),
          _mm256_blendv_ps(b.hi, a.hi, _mm256_cmp_ps(c.hi, z, _CMP_GE_OQ))};
}

template <class T> inline F load(const T* p) { return {simd::load8(p), simd::load8(p + 8)}; }
template <class T> inline void store(T* p, F a) { simd::store8(p, a.lo), simd::store8(p + 8, a.hi); }
template <class T>
inline F load_tail(const T* p, int64_t n) {
  if (n > 8) return {simd::load8(p), simd::load_tail(p + 8, n - 8, 0.0f)};
  return {simd::load_tail(p, n, 0.0f), _mm256_setzero_ps()};
}
template <class T>
inline void store_tail(T* p, int64_t n, F a) {
  if (n > 8) simd::store8(p, a.lo), simd::store_tail(p + 8, n - 8, a.hi);
  else simd::store_tail(p, n, a.lo);
}

inline float hsum(F a) { return simd::hsum(_mm256_add_ps(a.lo, a.hi)); }
inline F exp(F a) { return {simd::exp(a.lo), simd::exp(a.hi)}; }
#endif

}  // namespace fr::FR_ISA_NS::vec
#endif  // FR_HAVE_AVX2
