// Rotary embeddings on the CPU, one token at a time: the token's D/2 cosines and sines first (fp32
// angles widened to fp64, reduced by multiples of pi/2 and evaluated by fdlibm's kernel polynomials,
// 8 at a time; the baseline build calls std::sin/std::cos in fp64), then every head of q and k rotated
// with them. fp32/bf16/fp16 heads rotate on 16-lane blocks (common/vec.h: the AVX2 and AVX-512 builds
// give the same bits), fp64 heads in scalar fp64 with the fp32 cosines and sines, as HF's formula does.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/vec.h"
#include "rope/rope.h"

namespace fr::FR_ISA_NS {
namespace {

#if defined(FR_HAVE_AVX2)
// a = n pi/2 + r with n = round(a 2/pi) and |r| <= pi/4 (+ rounding); pi/2 in two parts, each step one
// fused multiply-add, leaves r within ~1e-16 for |a| < 2^30. Then sin r, cos r by fdlibm's __kernel_sin
// / __kernel_cos coefficients (errors ~1e-17), swapped and signed by n mod 4. Every angle's fp32 sine and
// cosine are then the correctly rounded ones, except within ~1e-16 of a rounding tie.
constexpr double kTwoOverPi = 0.63661977236758134308, kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52
constexpr double kPiO2Hi = 1.5707963267948966, kPiO2Lo = 6.123233995736766e-17;
constexpr double kS[6] = {-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
                          2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10};
constexpr double kC[6] = {4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
                          -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11};

#if defined(FR_HAVE_AVX512)
using PD = __m512d;
using PI = __m512i;
inline PD set1(double v) { return _mm512_set1_pd(v); }
inline PD fma(PD a, PD b, PD c) { return _mm512_fmadd_pd(a, b, c); }
inline PD fnma(PD a, PD b, PD c) { return _mm512_fnmadd_pd(a, b, c); }
inline PD mul(PD a, PD b) { return _mm512_mul_pd(a, b); }
inline PD sub(PD a, PD b) { return _mm512_sub_pd(a, b); }
inline PI bits(PD a) { return _mm512_castpd_si512(a); }
inline PD flip(PD a, PI sign) { return _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a), sign)); }
inline PI sign_of_bit1(PI q) {  // bit 1 of q as the sign bit
  return _mm512_slli_epi64(_mm512_and_si512(q, _mm512_set1_epi64(2)), 62);
}
inline PI plus1(PI q) { return _mm512_add_epi64(q, _mm512_set1_epi64(1)); }
inline void swap_odd(PI q, PD& s, PD& c) {
  const __mmask8 odd = _mm512_test_epi64_mask(q, _mm512_set1_epi64(1));
  const PD s0 = s;
  s = _mm512_mask_blend_pd(odd, s, c);
  c = _mm512_mask_blend_pd(odd, c, s0);
}
#else
using PD = __m256d;
using PI = __m256i;
inline PD set1(double v) { return _mm256_set1_pd(v); }
inline PD fma(PD a, PD b, PD c) { return _mm256_fmadd_pd(a, b, c); }
inline PD fnma(PD a, PD b, PD c) { return _mm256_fnmadd_pd(a, b, c); }
inline PD mul(PD a, PD b) { return _mm256_mul_pd(a, b); }
inline PD sub(PD a, PD b) { return _mm256_sub_pd(a, b); }
inline PI bits(PD a) { return _mm256_castpd_si256(a); }
inline PD flip(PD a, PI sign) { return _mm256_castsi256_pd(_mm256_xor_si256(_mm256_castpd_si256(a), sign)); }
inline PI sign_of_bit1(PI q) { return _mm256_slli_epi64(_mm256_and_si256(q, _mm256_set1_epi64x(2)), 62); }
inline PI plus1(PI q) { return _mm256_add_epi64(q, _mm256_set1_epi64x(1)); }
inline void swap_odd(PI q, PD& s, PD& c) {
  const PD odd = _mm256_castsi256_pd(
      _mm256_cmpeq_epi64(_mm256_and_si256(q, _mm256_set1_epi64x(1)), _mm256_set1_epi64x(1)));
  const PD s0 = s;
  s = _mm256_blendv_pd(s, c, odd);
  c = _mm256_blendv_pd(c, s0, odd);
}
#endif

// sin and cos of the angles in a, lane by lane
inline void sincos(PD a, PD& s, PD& c) {
  const PD t = fma(a, set1(kTwoOverPi), set1(kRoundMagic));  // n in the low mantissa bits
  const PD n = sub(t, set1(kRoundMagic));
  PD r = fnma(n, set1(kPiO2Hi), a);
  r = fnma(n, set1(kPiO2Lo), r);
  const PD r2 = mul(r, r);
  PD ps = set1(kS[5]), pc = set1(kC[5]);
  for (int i = 4; i >= 0; --i) {
    ps = fma(ps, r2, set1(kS[i]));
    pc = fma(pc, r2, set1(kC[i]));
  }
  s = fma(mul(r, r2), ps, r);                                // r + r^3 P(r^2)
  c = fma(mul(r2, r2), pc, fnma(set1(0.5), r2, set1(1.0)));  // 1 - r^2/2 + r^4 Q(r^2)
  const PI q = bits(t);  // n mod 4 in the low two bits (also for n < 0)
  swap_odd(q, s, c);
  s = flip(s, sign_of_bit1(q));
  c = flip(c, sign_of_bit1(plus1(q)));
}

constexpr int kLanesPD = sizeof(PD) / sizeof(double);

// s[i], c[i] = sin, cos of ang[i] rounded to fp32 (sin negated for the inverse), i < n (n % 8 == 0)
void table(const float* ang, float* s, float* c, int64_t n, bool inverse) {
  const PI neg = bits(set1(inverse ? -0.0 : 0.0));
  for (int64_t i = 0; i < n; i += kLanesPD) {
    PD sv, cv;
#if defined(FR_HAVE_AVX512)
    sincos(_mm512_cvtps_pd(_mm256_loadu_ps(ang + i)), sv, cv);
    _mm256_storeu_ps(s + i, _mm512_cvtpd_ps(flip(sv, neg)));
    _mm256_storeu_ps(c + i, _mm512_cvtpd_ps(cv));
#else
    sincos(_mm256_cvtps_pd(_mm_loadu_ps(ang + i)), sv, cv);
    _mm_storeu_ps(s + i, _mm256_cvtpd_ps(flip(sv, neg)));
    _mm_storeu_ps(c + i, _mm256_cvtpd_ps(cv));
#endif
  }
}
#else
void table(const float* ang, float* s, float* c, int64_t n, bool inverse) {
  for (int64_t i = 0; i < n; ++i) {
    const double a = ang[i];
    s[i] = float(inverse ? -std::sin(a) : std::sin(a));
    c[i] = float(std::cos(a));
  }
}
#endif

// One head: y = the rotation of x by the table. x, y: (D,) = two halves of `half`; c, s: (half,)
template <class T>
void rotate_row(const T* x, T* y, const float* c, const float* s, int64_t half) {
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    int64_t i = 0;
    for (; i + vec::W <= half; i += vec::W) {
      const vec::F x1 = vec::load(x + i), x2 = vec::load(x + half + i), cv = vec::load(c + i), sv = vec::load(s + i);
      vec::store(y + i, vec::fnmadd(x2, sv, x1 * cv));
      vec::store(y + half + i, vec::fmadd(x1, sv, x2 * cv));
    }
    if (i < half) {
      const int64_t n = half - i;
      const vec::F x1 = vec::load_tail(x + i, n), x2 = vec::load_tail(x + half + i, n);
      const vec::F cv = vec::load_tail(c + i, n), sv = vec::load_tail(s + i, n);
      vec::store_tail(y + i, n, vec::fnmadd(x2, sv, x1 * cv));
      vec::store_tail(y + half + i, n, vec::fmadd(x1, sv, x2 * cv));
    }
    return;
  }
#endif
  using acc = acc_t<T>;
  for (int64_t i = 0; i < half; ++i) {
    const acc x1 = to_acc(x[i]), x2 = to_acc(x[half + i]), ci = c[i], si = s[i];
    y[i] = from_acc<T>(x1 * ci - x2 * si);
    y[half + i] = from_acc<T>(x2 * ci + x1 * si);
  }
}

template <class T>
void run(const RopeParams& p) {
  const int64_t half = p.D / 2, padded = (half + 7) / 8 * 8;
  alignas(64) float inv[kRopeMaxD / 2] = {};  // inv_freq, zero-padded to a multiple of 8
  std::copy(p.inv_freq, p.inv_freq + half, inv);
  const int64_t work = (p.q.H + p.k.H) * p.D + half * 8;  // ~ the cost of one token in rotations
  parallel_for(0, p.B * p.T, std::max<int64_t>(1, (int64_t(1) << 14) / work), [&](int64_t i0, int64_t i1) {
    alignas(64) float ang[kRopeMaxD / 2], c[kRopeMaxD / 2], s[kRopeMaxD / 2];
    for (int64_t tok = i0; tok < i1; ++tok) {
      const int64_t b = tok / p.T, t = tok % p.T;
      const float pos = float(p.positions[b * p.pos_sb + t]);
      for (int64_t i = 0; i < padded; ++i) ang[i] = pos * inv[i];  // fp32, as HF's inv_freq @ positions
      table(ang, s, c, padded, p.inverse);
      for (const RopeTensor* r : {&p.q, &p.k}) {
        const T* x = static_cast<const T*>(r->x) + b * r->xs_b + t * r->xs_t;
        T* y = static_cast<T*>(r->y) + b * r->ys_b + t * r->ys_t;
        for (int64_t h = 0; h < r->H; ++h) rotate_row(x + h * r->xs_h, y + h * r->ys_h, c, s, half);
      }
    }
  });
}
}  // namespace

void rope_cpu(const RopeParams& p) { FR_DISPATCH_FLOAT(p.dtype, run<scalar_t>(p)); }

}  // namespace fr::FR_ISA_NS
