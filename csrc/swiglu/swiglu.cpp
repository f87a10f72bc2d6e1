// SwiGLU forward and backward on the CPU, elementwise. The logistic function is written with one exp
// of a non-positive argument, as in gelu.cpp, so nothing overflows and the negative tail keeps its
// relative accuracy:
//   a = exp(-|g|),  q = 1 / (1 + a),  s = sigmoid(g) = q if g >= 0 else a q,  s (1 - s) = a q^2.
// g is clamped at +-L inside, where a is exactly 0 (L = 128 in fp32, 1024 in fp64), so the infinities
// give the limits: silu(-inf) = -0 with derivative 0, silu(+inf) = inf with derivative 1 (silu(g) =
// g / (1 + exp(-g)) as torch writes it gives NaN at -inf); NaN stays NaN. fp32/bf16/fp16 run on 16-lane
// blocks (common/vec.h; the AVX2 and AVX-512 builds give the same bits), fp64 and the baseline build
// on scalar code with std::exp.
#include <cmath>
#include <type_traits>

#include "common/vec.h"
#include "swiglu/swiglu.h"

namespace fr::FR_ISA_NS {
namespace {

constexpr int64_t kGrain = int64_t(1) << 15;  // elements per task: below this the pool costs more than it saves

template <class acc> constexpr acc kClamp = std::is_same_v<acc, double> ? acc(1024) : acc(128);

template <class acc>
struct Gate {
  acc silu, dsilu;  // silu(g), silu'(g)
};

template <class acc>
inline Gate<acc> gate1(acc g) {
  const acc L = kClamp<acc>;
  const acc gc = g < -L ? -L : (g > L ? L : g);  // NaN stays NaN
  const acc a = std::exp(-std::fabs(g));
  const acc q = acc(1) / (acc(1) + a);
  const acc s = g >= 0 ? q : a * q;
  return {(g < -L ? -L : g) * s, s + gc * (a * q * q)};
}

#if defined(FR_HAVE_AVX2)
struct GateV {
  vec::F silu, dsilu;
};

// The same steps on 16 lanes; max(-L, g) and min(L, .) pass NaN (their second operand).
inline GateV gate16(vec::F g, bool need_dsilu) {
  const vec::F L = vec::set1(kClamp<float>), nL = vec::set1(-kClamp<float>), one = vec::set1(1.0f);
  const vec::F a = vec::exp(vec::or_bits(g, vec::set1(-0.0f)));  // exp(-|g|)
  const vec::F q = one / (one + a), aq = a * q;
  const vec::F s = vec::select_ge0(g, q, aq);
  const vec::F lo = vec::max(nL, g);
  GateV out{lo * s, s};
  if (need_dsilu) out.dsilu = vec::fmadd(vec::min(L, lo), aq * q, s);
  return out;
}
#endif

template <class T>
void fwd_range(const T* g, const T* u, T* y, int64_t n) {  // g, u, y: (n,)
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    int64_t i = 0;
    for (; i + vec::W <= n; i += vec::W) vec::store(y + i, gate16(vec::load(g + i), false).silu * vec::load(u + i));
    if (i < n) {
      const int64_t m = n - i;
      vec::store_tail(y + i, m, gate16(vec::load_tail(g + i, m), false).silu * vec::load_tail(u + i, m));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = from_acc<T>(gate1(to_acc(g[i])).silu * to_acc(u[i]));
}

template <class T>
void bwd_range(const T* g, const T* u, const T* dy, T* dg, T* du, int64_t n) {  // each (n,)
#if defined(FR_HAVE_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    int64_t i = 0;
    for (; i + vec::W <= n; i += vec::W) {
      const GateV t = gate16(vec::load(g + i), true);
      const vec::F d = vec::load(dy + i);
      vec::store(dg + i, d * vec::load(u + i) * t.dsilu);
      vec::store(du + i, d * t.silu);
    }
    if (i < n) {
      const int64_t m = n - i;
      const GateV t = gate16(vec::load_tail(g + i, m), true);
      const vec::F d = vec::load_tail(dy + i, m);
      vec::store_tail(dg + i, m, d * vec::load_tail(u + i, m) * t.dsilu);
      vec::store_tail(du + i, m, d * t.silu);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const auto t = gate1(to_acc(g[i]));
    const auto d = to_acc(dy[i]);
    dg[i] = from_acc<T>(d * to_acc(u[i]) * t.dsilu);
    du[i] = from_acc<T>(d * t.silu);
  }
}
}  // namespace

void swiglu_fwd_cpu(const SwigluFwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, {
    const scalar_t* g = static_cast<const scalar_t*>(p.gate);
    const scalar_t* u = static_cast<const scalar_t*>(p.up);
    scalar_t* y = static_cast<scalar_t*>(p.y);
    parallel_for(0, p.N, kGrain, [&](int64_t i0, int64_t i1) { fwd_range(g + i0, u + i0, y + i0, i1 - i0); });
  });
}

void swiglu_bwd_cpu(const SwigluBwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, {
    const scalar_t* g = static_cast<const scalar_t*>(p.gate);
    const scalar_t* u = static_cast<const scalar_t*>(p.up);
    const scalar_t* dy = static_cast<const scalar_t*>(p.dy);
    scalar_t* dg = static_cast<scalar_t*>(p.dgate);
    scalar_t* du = static_cast<scalar_t*>(p.dup);
    parallel_for(0, p.N, kGrain, [&](int64_t i0, int64_t i1) {
      bwd_range(g + i0, u + i0, dy + i0, dg + i0, du + i0, i1 - i0);
    });
  });
}

}  // namespace fr::FR_ISA_NS
