// GELU (tanh) forward and backward, elementwise. Written through the logistic function so that one
// exp serves both tails: 0.5 (1 + tanh(u)) = sigmoid(z) with z = 2u, and
//   sigmoid(z) = q if z >= 0 else a q,   a = exp(-|z|) in (0, 1],  q = 1 / (1 + a),
//   sigmoid'(z) = sigmoid(z) (1 - sigmoid(z)) = a q^2,
// so nothing overflows and the negative tail keeps its relative accuracy (torch's 1 + tanh(u) cancels
// to 0 below x ~ -5). y = x sigmoid(z); dy/dx = sigmoid(z) + x a q^2 dz/dx.
// |x| is clamped at L = 30 inside: there z = +-1974, so sigmoid is exactly 1 or 0 and a q^2 exactly
// 0 in fp32 and fp64 alike; hence +inf -> y = inf, dy/dx = 1; -inf -> y = -0, dy/dx = 0 (the limits;
// F.gelu gives NaN for -inf and for both derivatives at +-inf); NaN -> NaN.
// float32/bf16/f16 are computed in fp32 (8 lanes at a time in the AVX2 build, row tails through the
// same vector code), float64 by a scalar fp64 path (gradcheck needs it exact).
#include <cmath>
#include <type_traits>

#include "common/simd.h"
#include "gelu/gelu.h"

namespace fr::FR_ISA_NS {

namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654, kCubic = 0.044715;
constexpr double kC0 = 2 * kSqrt2OverPi, kC1 = 2 * kSqrt2OverPi * kCubic;  // z = x (kC0 + kC1 x^2)
constexpr double kClamp = 30;
// ~30 flops per element: a chunk smaller than this is cheaper than waking the thread pool.
constexpr int64_t kGrain = int64_t(1) << 16;

template <class acc>
struct Terms {
  acc xc, s, aqq;  // clamped x, sigmoid(z), sigmoid'(z)
};

template <class acc>
inline Terms<acc> terms(acc x) {
  const acc L = acc(kClamp);
  const acc xc = x < -L ? -L : (x > L ? L : x);  // NaN stays NaN
  const acc z = xc * (acc(kC0) + acc(kC1) * xc * xc);
  const acc a = std::exp(-std::fabs(z));
  const acc q = acc(1) / (acc(1) + a);
  return {xc, z >= 0 ? q : a * q, a * q * q};
}

template <class acc>
inline acc fwd1(acc x) {
  const Terms<acc> t = terms(x);
  return (x < -acc(kClamp) ? -acc(kClamp) : x) * t.s;  // -inf * 0 would be NaN
}

template <class acc>
inline acc bwd1(acc x, acc dy) {
  const Terms<acc> t = terms(x);
  return dy * (t.s + t.xc * t.aqq * (acc(kC0) + acc(3 * kC1) * t.xc * t.xc));
}

#if defined(FR_HAVE_AVX2)
// The same math on 8 fp32 lanes (max/min return their second operand for NaN: NaN passes). z is built
// directly in base 2, z2 = z log2(e), so exp(-|z|) = exp2(-|z2|) costs no extra rounding. On the
// machines measured (Zen 1) these loops are bound by FMA/mul throughput, hence Horner, not Estrin.
constexpr double kLog2e = 1.4426950408889634;
inline __m256 clamp8(__m256 x) {
  return _mm256_min_ps(_mm256_set1_ps(float(kClamp)), _mm256_max_ps(_mm256_set1_ps(-float(kClamp)), x));
}
inline __m256 z2_8(__m256 xc) {
  return _mm256_mul_ps(xc, _mm256_fmadd_ps(_mm256_set1_ps(float(kC1 * kLog2e)), _mm256_mul_ps(xc, xc),
                                           _mm256_set1_ps(float(kC0 * kLog2e))));
}

// simd::exp2 with w also clamped above at 128, where its exponent trick gives +inf: the forward wants
// that (x / inf = -0 in the far negative tail). min(128, NaN) is NaN.
inline __m256 exp2_to_inf(__m256 w) { return simd::exp2(_mm256_min_ps(_mm256_set1_ps(128.0f), w)); }

// y = x / (1 + exp(-z)): no select between the tails and one rounding division (~1 ulp); exp(-z) is
// +inf for x <= -L, where max(x, -L) / inf = -0 (also for x = -inf).
inline __m256 fwd8(__m256 x) {
  const __m256 e = exp2_to_inf(_mm256_xor_ps(z2_8(clamp8(x)), _mm256_set1_ps(-0.0f)));
  return _mm256_div_ps(_mm256_max_ps(_mm256_set1_ps(-float(kClamp)), x), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// The symmetric form of the header comment: a q^2 must be exactly 0 in both tails (inf * 0 is NaN).
inline __m256 bwd8(__m256 x, __m256 dy) {
  const __m256 xc = clamp8(x);
  const __m256 z2 = z2_8(xc);
  const __m256 a = simd::exp2(_mm256_or_ps(z2, _mm256_set1_ps(-0.0f)));  // exp(-|z|); 0 below 2^-126.5
  const __m256 q = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), a));
  const __m256 aq = _mm256_mul_ps(a, q);
  const __m256 s = _mm256_blendv_ps(aq, q, _mm256_cmp_ps(z2, _mm256_setzero_ps(), _CMP_GE_OQ));
  const __m256 dz = _mm256_fmadd_ps(_mm256_set1_ps(float(3 * kC1)), _mm256_mul_ps(xc, xc),
                                    _mm256_set1_ps(float(kC0)));
  return _mm256_mul_ps(dy, _mm256_fmadd_ps(_mm256_mul_ps(xc, _mm256_mul_ps(aq, q)), dz, s));
}
#endif

template <class T>
void fwd_range(const T* x, T* y, int64_t n) {  // x, y: (n,)
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) simd::store8(y + i, fwd8(simd::load8(x + i)));
    if (i < n) simd::store_tail(y + i, n - i, fwd8(simd::load_tail(x + i, n - i, 0.0f)));
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = from_acc<T>(fwd1(to_acc(x[i])));
}

template <class T>
void bwd_range(const T* x, const T* dy, T* dx, int64_t n) {  // x, dy, dx: (n,)
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) simd::store8(dx + i, bwd8(simd::load8(x + i), simd::load8(dy + i)));
    if (i < n)
      simd::store_tail(dx + i, n - i, bwd8(simd::load_tail(x + i, n - i, 0.0f), simd::load_tail(dy + i, n - i, 0.0f)));
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dx[i] = from_acc<T>(bwd1(to_acc(x[i]), to_acc(dy[i])));
}
}  // namespace

void gelu_tanh_fwd_cpu(const GeluFwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, {
    const scalar_t* x = static_cast<const scalar_t*>(p.x);
    scalar_t* y = static_cast<scalar_t*>(p.y);
    parallel_for(0, p.N, kGrain, [&](int64_t i0, int64_t i1) { fwd_range(x + i0, y + i0, i1 - i0); });
  });
}

void gelu_tanh_bwd_cpu(const GeluBwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, {
    const scalar_t* x = static_cast<const scalar_t*>(p.x);
    const scalar_t* dy = static_cast<const scalar_t*>(p.dy);
    scalar_t* dx = static_cast<scalar_t*>(p.dx);
    parallel_for(0, p.N, kGrain, [&](int64_t i0, int64_t i1) { bwd_range(x + i0, dy + i0, dx + i0, i1 - i0); });
  });
}

}  // namespace fr::FR_ISA_NS
