// Attention backward (FlashAttention-2, arXiv 2307.08691, alg. 2) in two passes so that both stay
// parallel when B * H is small and no task needs atomics:
//   pass 1, one task per (b, kv head, key tile): dK, dV, summed over the group's query heads;
//   pass 2, one task per (b, h, query tile): dQ.
// Each recomputes P = exp2(S * scale * log2 e - lse * log2 e) and dS = P * (dP - Delta) tile by tile.
#include "attention/attention.h"

#include "attention/tiles.h"

namespace fr::FR_ISA_NS {
using namespace attn;

namespace {
// Everything both passes read, converted once: padded rows and transposed key tiles in the math type.
template <class S>
struct BwdInputs {
  using T = acc_t<S>;
  Geom g;
  Buf<T> q_hold, do_hold, k_hold, delta_hold, lse2_hold;
  const T *q, *dout, *k;  // (B, H, Tq, Dp), (B, H, Tq, Dp), (B, Hkv, Tk, Dp)
  Buf<T> kt, vt;          // (B * Hkv, nKt, D, kBk) each
  const T *delta, *lse2;  // (B, H, Tq) each: rowsum(dO * O) and lse in log2 units
  T c;                    // scale * log2(e)

  explicit BwdInputs(const AttnBwdParams& p) : g(p.B, p.H, p.Hkv, p.Tq, p.Tk, p.D, p.seg) {
    const int64_t nq = g.B * g.H * g.Tq, nk = g.B * g.Hkv * g.Tk;
    q = padded_rows<S, T>(g, static_cast<const S*>(p.q), nq, q_hold);
    dout = padded_rows<S, T>(g, static_cast<const S*>(p.dout), nq, do_hold);
    k = padded_rows<S, T>(g, static_cast<const S*>(p.k), nk, k_hold);
    kt = pack_transposed<S, T>(g, static_cast<const S*>(p.k));
    vt = pack_transposed<S, T>(g, static_cast<const S*>(p.v));
    c = T(p.scale * 1.4426950408889634);
    delta_hold = alloc<T>(nq);
    lse2_hold = alloc<T>(nq);
    const S* o = static_cast<const S*>(p.out);  // (B, H, Tq, D)
    const T* lse = static_cast<const T*>(p.lse);  // (B, H, Tq)
    parallel_for(0, nq, std::max<int64_t>(1, 32768 / g.D), [&](int64_t r0, int64_t r1) {
      T row[256];
      for (int64_t r = r0; r < r1; ++r) {
        load_row(o + r * g.D, row, g.D, T(1));
        delta_hold[r] = dot(dout + r * g.Dp, row, g.D);
        lse2_hold[r] = lse[r] * T(1.4426950408889634);
      }
    });
    delta = delta_hold.get();
    lse2 = lse2_hold.get();
  }

  // For query tile qi of head (b, h) against key tile j0: P into Sc, dS into Sc, dP scratch in dP.
  // Sc and dP are (M, kBk); padded and masked columns of P end up 0.
  void probs_and_grad(const QTile& qi, int64_t b, int64_t bh, int64_t kvh, int64_t j0, int64_t kn, Cover cov,
                      T* Sc, T* dP, bool want_p_first, T* dv_acc) const {
    const int64_t N = round8(kn), row0 = bh * g.Tq + qi.i0;
    const int64_t tile = (b * g.Hkv + kvh) * g.nKt + j0 / kBk;
    const T* qr = q + row0 * g.Dp;      // (M, Dp)
    const T* dor = dout + row0 * g.Dp;  // (M, Dp)
    gemm(qi.M, N, g.D, qr, g.Dp, 1, kt.get() + tile * g.D * kBk, kBk, Sc, kBk, false);  // S = q k^T
    for (int64_t r = 0; r < qi.M; ++r) exp2_fms(Sc + r * kBk, N, c, lse2[row0 + r]);
    // The mask goes on P (not on S) so that it does not depend on the sign of the scale.
    if (cov == Cover::masked) apply_mask(g, qi, b, j0, kn, Sc, kBk, N, T(0));
    if (want_p_first) gemm(kn, g.Dp, qi.M, Sc, 1, kBk, dor, g.Dp, dv_acc, g.Dp, true);  // dV += P^T dO
    gemm(qi.M, N, g.D, dor, g.Dp, 1, vt.get() + tile * g.D * kBk, kBk, dP, kBk, false);  // dP = dO v^T
    for (int64_t r = 0; r < qi.M; ++r) softmax_grad(Sc + r * kBk, dP + r * kBk, N, delta[row0 + r]);
  }
};
}  // namespace

// The key tile [j0, j0 + kn) of (b, kv head): dK, dV over the group's query heads, and, when dq_acc
// is given ((G, Tq, Dp) for this (b, kv head)), dQ += dS k as well: the one-pass schedule.
template <class S>
static void key_tile(const BwdInputs<S>& in, const AttnBwdParams& p, int64_t bk, int64_t j0, acc_t<S>* scratch,
                     acc_t<S>* dq_acc) {
  using T = acc_t<S>;
  const Geom& g = in.g;
  const int64_t b = bk / g.Hkv, kvh = bk % g.Hkv, kn = std::min(kBk, g.Tk - j0);
  T* Sc = scratch;              // (kBq, kBk)
  T* dP = Sc + kBq * kBk;       // (kBq, kBk)
  T* dK = dP + kBq * kBk;       // (kn, Dp)
  T* dV = dK + kBk * g.Dp;      // (kn, Dp)
  std::fill(dK, dK + 2 * kBk * g.Dp, T(0));
  const T* kr = in.k + (bk * g.Tk + j0) * g.Dp;  // (kn, Dp)
  for (int64_t hh = 0; hh < g.G; ++hh) {
    const int64_t bh = b * g.H + kvh * g.G + hh;
    for (int64_t qt = std::max<int64_t>(0, (j0 - g.off) / kBq); qt < g.nQt; ++qt) {
      const QTile qi = q_tile(g, b, qt);
      const Cover cov = cover(g, qi, b, j0, kn);
      if (cov == Cover::none) continue;
      in.probs_and_grad(qi, b, bh, kvh, j0, kn, cov, Sc, dP, true, dV);
      const T* qr = in.q + (bh * g.Tq + qi.i0) * g.Dp;  // (M, Dp)
      gemm(kn, g.Dp, qi.M, Sc, 1, kBk, qr, g.Dp, dK, g.Dp, true);  // dK += dS^T q
      if (dq_acc) {
        T* dq = dq_acc + (hh * g.Tq + qi.i0) * g.Dp;  // (M, Dp)
        gemm(qi.M, g.Dp, kn, Sc, kBk, 1, kr, g.Dp, dq, g.Dp, true);  // dQ += dS k
      }
    }
  }
  S* dk = static_cast<S*>(p.dk) + (bk * g.Tk + j0) * g.D;  // (kn, D)
  S* dv = static_cast<S*>(p.dv) + (bk * g.Tk + j0) * g.D;  // (kn, D)
  for (int64_t j = 0; j < kn; ++j) {
    store_row(dK + j * g.Dp, dk + j * g.D, g.D, T(p.scale));
    store_row(dV + j * g.Dp, dv + j * g.D, g.D, T(1));
  }
}

// Two schedules with bit-identical results (every dQ tile sums the same dS k products in the same
// key order): one pass per (b, kv head) does 5 tile GEMMs per (query, key) tile pair; two passes
// do 7 (S and dP are recomputed for dQ) but split the work finely enough to keep every thread busy.
template <class S>
static void attention_bwd(const AttnBwdParams& p) {
  using T = acc_t<S>;
  const BwdInputs<S> in(p);
  const Geom& g = in.g;
  const T scale = T(p.scale);
  const int64_t BK = g.B * g.Hkv, threads = std::max(1, num_threads());
  const int64_t rounds = (BK + threads - 1) / threads;  // one-pass tasks per thread, the last round partly idle
  const int64_t n_tile = 2 * kBq * kBk + 2 * kBk * g.Dp;

  if (rounds * threads * 5 < BK * 7) {
    run_tasks<T>(BK, n_tile + g.G * g.Tq * g.Dp, 2.5 * attn_flops(g), [&](int64_t bk, T* scratch) {
      T* dq_acc = scratch + n_tile;  // (G, Tq, Dp)
      std::fill(dq_acc, dq_acc + g.G * g.Tq * g.Dp, T(0));
      for (int64_t j0 = 0; j0 < g.Tk; j0 += kBk) key_tile(in, p, bk, j0, scratch, dq_acc);
      S* dq = static_cast<S*>(p.dq) + bk * g.G * g.Tq * g.D;  // (G * Tq, D)
      for (int64_t r = 0; r < g.G * g.Tq; ++r) store_row(dq_acc + r * g.Dp, dq + r * g.D, g.D, scale);
    });
    return;
  }

  // pass 1: dK, dV per (b, kv head, key tile); low key tiles see the most queries, so they go first.
  run_tasks<T>(g.nKt * BK, n_tile, 2 * attn_flops(g), [&](int64_t t, T* scratch) {
    key_tile(in, p, t % BK, (t / BK) * kBk, scratch, nullptr);
  });

  // pass 2: dQ per (b, h, query tile), longest rows first.
  const int64_t BH = g.B * g.H;
  run_tasks<T>(g.nQt * BH, 2 * kBq * kBk + kBq * g.Dp, 1.5 * attn_flops(g), [&](int64_t t, T* scratch) {
    const int64_t qt = g.nQt - 1 - t / BH, bh = t % BH, b = bh / g.H, kvh = (bh % g.H) / g.G;
    const QTile qi = q_tile(g, b, qt);
    T* Sc = scratch;              // (kBq, kBk)
    T* dP = Sc + kBq * kBk;       // (kBq, kBk)
    T* dQ = dP + kBq * kBk;       // (M, Dp)
    std::fill(dQ, dQ + qi.M * g.Dp, T(0));
    for (int64_t j0 = 0; j0 <= qi.p_last; j0 += kBk) {
      const int64_t kn = std::min(kBk, g.Tk - j0);
      const Cover cov = cover(g, qi, b, j0, kn);
      if (cov == Cover::none) continue;
      in.probs_and_grad(qi, b, bh, kvh, j0, kn, cov, Sc, dP, false, nullptr);
      const T* kr = in.k + ((b * g.Hkv + kvh) * g.Tk + j0) * g.Dp;  // (kn, Dp)
      gemm(qi.M, g.Dp, kn, Sc, kBk, 1, kr, g.Dp, dQ, g.Dp, true);  // dQ += dS k
    }
    S* dq = static_cast<S*>(p.dq) + (bh * g.Tq + qi.i0) * g.D;  // (M, D)
    for (int64_t r = 0; r < qi.M; ++r) store_row(dQ + r * g.Dp, dq + r * g.D, g.D, scale);
  });
}

void attention_bwd_cpu(const AttnBwdParams& p) { FR_DISPATCH_FLOAT(p.dtype, attention_bwd<scalar_t>(p)); }

}  // namespace fr::FR_ISA_NS
