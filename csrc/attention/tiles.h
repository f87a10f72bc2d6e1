// Tile geometry, masking, operand packing and task scheduling shared by the attention forward and
// backward. Included only from csrc/attention/*.cpp (compiled once per ISA).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "attention/micro.h"
#include "common/runtime.h"

namespace fr::FR_ISA_NS::attn {

// Rows per query tile and keys per key tile: a 64 x 64 fp32 score tile is 16 KiB, so the working
// set of a task (Q, K^T, V, S and O tiles at D = 64) stays in L2.
constexpr int64_t kBq = 64, kBk = 64;

template <class T>
using Buf = std::unique_ptr<T[]>;
template <class T>
inline Buf<T> alloc(int64_t n) {
  return Buf<T>(new T[size_t(std::max<int64_t>(n, 1))]);
}

struct Geom {
  int64_t B, H, Hkv, G, Tq, Tk, D;
  int64_t Dp;          // D rounded up to a multiple of 8: the row stride of padded tiles
  int64_t off;         // Tk - Tq: query i sits at position i + off
  int64_t nQt, nKt;    // number of query / key tiles
  const int64_t* seg;  // (B, Tk) or nullptr
  Geom(int64_t B_, int64_t H_, int64_t Hkv_, int64_t Tq_, int64_t Tk_, int64_t D_, const int64_t* seg_)
      : B(B_),
        H(H_),
        Hkv(Hkv_),
        G(H_ / Hkv_),
        Tq(Tq_),
        Tk(Tk_),
        D(D_),
        Dp(round8(D_)),
        off(Tk_ - Tq_),
        nQt((Tq_ + kBq - 1) / kBq),
        nKt((Tk_ + kBk - 1) / kBk),
        seg(seg_) {}
};

// A query tile: rows [i0, i0 + M), positions [p_first, p_last], segment ids in [seg_lo, seg_hi].
struct QTile {
  int64_t i0, M, p_first, p_last, seg_lo, seg_hi;
};
inline QTile q_tile(const Geom& g, int64_t b, int64_t qt) {
  QTile q;
  q.i0 = qt * kBq;
  q.M = std::min(kBq, g.Tq - q.i0);
  q.p_first = q.i0 + g.off;
  q.p_last = q.p_first + q.M - 1;
  q.seg_lo = q.seg_hi = 0;
  if (g.seg) {
    const int64_t* s = g.seg + b * g.Tk;  // (Tk,)
    q.seg_lo = q.seg_hi = s[q.p_first];
    for (int64_t p = q.p_first + 1; p <= q.p_last; ++p) {
      q.seg_lo = std::min(q.seg_lo, s[p]);
      q.seg_hi = std::max(q.seg_hi, s[p]);
    }
  }
  return q;
}

// How the key tile [j0, j0 + kn) meets a query tile: not at all (skip it), entirely (no mask), or
// partly (diagonal tiles, mixed segments, a short last tile): apply the element mask.
enum class Cover { none, full, masked };
inline Cover cover(const Geom& g, const QTile& q, int64_t b, int64_t j0, int64_t kn) {
  if (j0 > q.p_last) return Cover::none;
  bool full = j0 + kn - 1 <= q.p_first && kn == kBk;
  if (g.seg) {
    const int64_t* s = g.seg + b * g.Tk + j0;  // (kn,)
    int64_t lo = s[0], hi = s[0];
    for (int64_t j = 1; j < kn; ++j) {
      lo = std::min(lo, s[j]);
      hi = std::max(hi, s[j]);
    }
    if (hi < q.seg_lo || lo > q.seg_hi) return Cover::none;
    full = full && lo == hi && q.seg_lo == q.seg_hi && lo == q.seg_lo;
  }
  return full ? Cover::full : Cover::masked;
}

// Causal diagonal geometry of a (query tile, key tile) pair: row r sees columns c < r + lim.
inline int64_t diag_lim(const QTile& q, int64_t j0) { return q.p_first - j0 + 1; }
// Columns of row r that a masked tile needs, rounded to whole 8-wide blocks.
inline int64_t row_cols(int64_t r, int64_t lim, int64_t kn) {
  return round8(std::clamp<int64_t>(r + lim, 0, kn));
}

// Writes `fill` into S (M, N) (row stride ld) wherever query row r may not see key column c
// (c >= kn included: the zero padding of a short tile).
template <class T>
inline void apply_mask(const Geom& g, const QTile& q, int64_t b, int64_t j0, int64_t kn, T* S, int64_t ld,
                       int64_t N, T fill) {
  const int64_t* sk = g.seg ? g.seg + b * g.Tk + j0 : nullptr;  // (kn,)
  for (int64_t r = 0; r < q.M; ++r) {
    const int64_t p = q.p_first + r;
    const int64_t vis = std::clamp<int64_t>(p - j0 + 1, 0, kn);  // causally visible: [0, vis)
    T* s = S + r * ld;                                           // (N,)
    for (int64_t c = vis; c < N; ++c) s[c] = fill;
    if (sk) {
      const int64_t sp = g.seg[b * g.Tk + p];
      for (int64_t c = 0; c < vis; ++c)
        if (sk[c] != sp) s[c] = fill;
    }
  }
}

// A key tile's K^T (or V^T) in the math type: dst (D, kBk) from src rows (kn, D); columns
// [kn, round8(kn)) are zeroed so a GEMM may read whole 8-wide column blocks.
template <class S, class T>
inline void pack_transposed(const S* src, int64_t kn, int64_t D, T* dst) {
  int64_t j0 = 0;
#if defined(FR_HAVE_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    for (; j0 + 8 <= kn; j0 += 8) {
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8(src + (j0 + i) * D + d);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d + i) * kBk + j0, r[i]);
      }
      for (; d < D; ++d)
        for (int64_t j = j0; j < j0 + 8; ++j) dst[d * kBk + j] = to_acc(src[j * D + d]);
    }
  }
#endif
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = j0; j < kn; ++j) dst[d * kBk + j] = T(to_acc(src[j * D + d]));
    for (int64_t j = kn; j < round8(kn); ++j) dst[d * kBk + j] = T(0);
  }
}

// Rows (n, D) as (n, Dp) in the math type, zero padded: the input itself when it already is that,
// else a converted copy in `scratch`.
template <class S, class T>
inline const T* padded_rows(const Geom& g, const S* src, int64_t n, T* scratch) {
  if constexpr (std::is_same_v<S, T>) {
    if (g.D == g.Dp) return src;
  }
  for (int64_t r = 0; r < n; ++r) {
    load_row(src + r * g.D, scratch + r * g.Dp, g.D, T(1));
    std::fill(scratch + r * g.Dp + g.D, scratch + (r + 1) * g.Dp, T(0));
  }
  return scratch;
}
template <class S, class T>
inline bool needs_copy(const Geom& g) {
  return !std::is_same_v<S, T> || g.D != g.Dp;
}

// Runs task(t, scratch) for t in [0, n): workers take tasks in order from a shared counter, so
// when callers order tasks largest first the triangular work balances. Each task writes only its
// own outputs in a fixed order, so results do not depend on the thread count. Problems under
// ~1 MFLOP (`flops`) run on the calling thread: waking the pool costs more than they do.
template <class T, class F>
void run_tasks(int64_t n, int64_t scratch_elems, double flops, const F& task) {
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    Buf<T> scratch = alloc<T>(scratch_elems);
    for (int64_t t; (t = next.fetch_add(1)) < n;) task(t, scratch.get());
  };
  const int64_t workers = flops < 1e6 ? 1 : std::max<int64_t>(1, std::min<int64_t>(num_threads(), n));
  if (workers == 1)
    worker(0, 1);
  else
    parallel_for(0, workers, 1, worker);
}

// Flops of the causal score and value GEMMs of one pass (half the Tq x Tk rectangle).
inline double attn_flops(const Geom& g) { return 2.0 * g.B * g.H * g.Tq * double(g.Tk) * g.D; }

}  // namespace fr::FR_ISA_NS::attn
