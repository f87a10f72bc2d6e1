// RMSNorm forward and backward on the CPU, one row at a time (a row of C <= a few thousand fits in L1,
// so the backward's two sweeps over it cost one read from memory). fp32/bf16/fp16 rows run on 16-lane
// blocks (common/vec.h: the AVX2 and AVX-512 builds give the same bits), fp64 rows and the baseline
// build on scalar loops. y = (x r) w in that order, as HF's LlamaRMSNorm rounds it in fp32.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/vec.h"
#include "rms_norm/rms_norm.h"

namespace fr::FR_ISA_NS {
namespace {

template <class T>
constexpr bool kVector =
#if defined(FR_HAVE_AVX2)
    !std::is_same_v<T, double>;
#else
    false;
#endif

// sum of term(j) for j < C in 16 interleaved partial sums (as the vector builds' lanes), then a tree:
// the scalar builds' sums are as accurate as the vector ones (a plain running sum loses ~sqrt(C) more).
template <class acc, class Term>
acc sum16(int64_t C, const Term& term) {
  acc s[16] = {};
  for (int64_t j0 = 0; j0 < C; j0 += 16)
    for (int64_t l = 0; l < 16 && j0 + l < C; ++l) s[l] += term(j0 + l);
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

template <class T>
acc_t<T> sum_sq(const T* x, int64_t C) {  // x: (C,)
#if defined(FR_HAVE_AVX2)
  if constexpr (kVector<T>) {
    vec::F acc = vec::set1(0.0f);
    int64_t j = 0;
    for (; j + vec::W <= C; j += vec::W) {
      const vec::F v = vec::load(x + j);
      acc = vec::fmadd(v, v, acc);
    }
    if (j < C) {
      const vec::F v = vec::load_tail(x + j, C - j);
      acc = vec::fmadd(v, v, acc);
    }
    return vec::hsum(acc);
  }
#endif
  return sum16<acc_t<T>>(C, [&](int64_t j) { return to_acc(x[j]) * to_acc(x[j]); });
}

// y = (x r) w for one row. x, y: (C,); w: (C,)
template <class T, class Wt>
void scale_row(const T* x, const Wt* w, acc_t<T> r, T* y, int64_t C) {
#if defined(FR_HAVE_AVX2)
  if constexpr (kVector<T>) {
    const vec::F rv = vec::set1(r);
    int64_t j = 0;
    for (; j + vec::W <= C; j += vec::W) vec::store(y + j, vec::load(x + j) * rv * vec::load(w + j));
    if (j < C) vec::store_tail(y + j, C - j, vec::load_tail(x + j, C - j) * rv * vec::load_tail(w + j, C - j));
    return;
  }
#endif
  using acc = acc_t<T>;
  for (int64_t j = 0; j < C; ++j) y[j] = from_acc<T>(to_acc(x[j]) * r * acc(to_acc(w[j])));
}

// sum of (dy w) x over one row. dy, x: (C,); w: (C,)
template <class T, class Wt>
acc_t<T> dot_gx(const T* dy, const T* x, const Wt* w, int64_t C) {
#if defined(FR_HAVE_AVX2)
  if constexpr (kVector<T>) {
    vec::F acc = vec::set1(0.0f);
    int64_t j = 0;
    for (; j + vec::W <= C; j += vec::W) acc = vec::fmadd(vec::load(dy + j) * vec::load(w + j), vec::load(x + j), acc);
    if (j < C) {
      const int64_t n = C - j;
      acc = vec::fmadd(vec::load_tail(dy + j, n) * vec::load_tail(w + j, n), vec::load_tail(x + j, n), acc);
    }
    return vec::hsum(acc);
  }
#endif
  using acc = acc_t<T>;
  return sum16<acc>(C, [&](int64_t j) { return to_acc(dy[j]) * acc(to_acc(w[j])) * to_acc(x[j]); });
}

// dx = r (dy w) - k x and pw += dy (x r) for one row. dy, x, dx: (C,); w: (C,); pw: (C,) acc
template <class T, class Wt>
void dx_row(const T* dy, const T* x, const Wt* w, acc_t<T> r, acc_t<T> k, T* dx, acc_t<T>* pw, int64_t C) {
#if defined(FR_HAVE_AVX2)
  if constexpr (kVector<T>) {
    const vec::F rv = vec::set1(r), kv = vec::set1(k);
    int64_t j = 0;
    for (; j + vec::W <= C; j += vec::W) {
      const vec::F d = vec::load(dy + j), xv = vec::load(x + j);
      vec::store(dx + j, vec::fnmadd(xv, kv, d * vec::load(w + j) * rv));
      vec::store(pw + j, vec::fmadd(d, xv * rv, vec::load(pw + j)));
    }
    if (j < C) {
      const int64_t n = C - j;
      const vec::F d = vec::load_tail(dy + j, n), xv = vec::load_tail(x + j, n);
      vec::store_tail(dx + j, n, vec::fnmadd(xv, kv, d * vec::load_tail(w + j, n) * rv));
      vec::store_tail(pw + j, n, vec::fmadd(d, xv * rv, vec::load_tail(pw + j, n)));
    }
    return;
  }
#endif
  using acc = acc_t<T>;
  for (int64_t j = 0; j < C; ++j) {
    const acc d = to_acc(dy[j]), xv = to_acc(x[j]);
    dx[j] = from_acc<T>(d * acc(to_acc(w[j])) * r - xv * k);
    pw[j] += d * (xv * r);
  }
}

template <class T, class Wt>
void fwd(const RmsNormFwdParams& p) {
  using acc = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);  // (N, C)
  const Wt* w = static_cast<const Wt*>(p.w);  // (C,)
  T* y = static_cast<T*>(p.y);  // (N, C)
  acc* rstd = static_cast<acc*>(p.rstd);  // (N,)
  const int64_t C = p.C, grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(C, 1));
  parallel_for(0, p.N, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc r = acc(1) / std::sqrt(sum_sq(x + i * C, C) / acc(C) + acc(p.eps));
      rstd[i] = r;
      scale_row(x + i * C, w, r, y + i * C, C);
    }
  });
}

template <class T, class Wt>
void bwd(const RmsNormBwdParams& p) {
  using acc = acc_t<T>;
  const T* dy = static_cast<const T*>(p.dy);  // (N, C)
  const T* x = static_cast<const T*>(p.x);  // (N, C)
  const Wt* w = static_cast<const Wt*>(p.w);  // (C,)
  const acc* rstd = static_cast<const acc*>(p.rstd);  // (N,)
  T* dx = static_cast<T*>(p.dx);  // (N, C)
  acc* partial = static_cast<acc*>(p.partial);  // (chunks, C)
  const int64_t N = p.N, C = p.C, chunks = rms_norm_chunks(N);
  // tasks of >= ~16k elements: below that, waking a pool thread costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(kRmsNormChunk * C, 1));
  parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc* pw = partial + c * C;
      std::fill(pw, pw + C, acc(0));
      for (int64_t i = c * kRmsNormChunk; i < std::min(N, (c + 1) * kRmsNormChunk); ++i) {
        const acc r = rstd[i];
        const acc k = r * r * r * dot_gx(dy + i * C, x + i * C, w, C) / acc(C);
        dx_row(dy + i * C, x + i * C, w, r, k, dx + i * C, pw, C);
      }
    }
  });
  // dw = the chunks' sums added pairwise in a fixed tree, in place, 256 columns at a time
  Wt* dw = static_cast<Wt*>(p.dw);  // (C,)
  const int64_t col_grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(256 * chunks, 1));
  parallel_for(0, (C + 255) / 256, col_grain, [&](int64_t b0, int64_t b1) {
    for (int64_t j0 = b0 * 256; j0 < std::min(C, b1 * 256); j0 += 256) {
      const int64_t n = std::min<int64_t>(256, C - j0);
      for (int64_t stride = 1; stride < chunks; stride *= 2)
        for (int64_t c = 0; c + stride < chunks; c += 2 * stride)
          for (int64_t j = j0; j < j0 + n; ++j) partial[c * C + j] += partial[(c + stride) * C + j];
      for (int64_t j = j0; j < j0 + n; ++j) dw[j] = from_acc<Wt>(chunks ? partial[j] : acc(0));
    }
  });
}
}  // namespace

void rms_norm_fwd_cpu(const RmsNormFwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, {
    if (p.w_dtype == DType::f32) fwd<scalar_t, float>(p);
    else fwd<scalar_t, scalar_t>(p);
  });
}

void rms_norm_bwd_cpu(const RmsNormBwdParams& p) {
  FR_DISPATCH_FLOAT(p.dtype, {
    if (p.w_dtype == DType::f32) bwd<scalar_t, float>(p);
    else bwd<scalar_t, scalar_t>(p);
  });
}

}  // namespace fr::FR_ISA_NS
