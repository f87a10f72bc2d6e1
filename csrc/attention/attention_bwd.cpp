// Attention backward (FlashAttention-2, arXiv 2307.08691, alg. 2): for each (query, key) tile pair
// recompute P = exp2(S * scale * log2 e - lse * log2 e), dP = dO v^T, dS = P * (dP - Delta) with
// Delta = rowsum(dO * O), and accumulate dV += P^T dO, dK += dS^T q, dQ += dS k. Two schedules:
//   one pass, one task per (b, kv head): all five products, dQ kept for the task's heads (5 GEMMs);
//   two passes, one task per (b, kv head, key tile) for dK, dV, then one per (b, h, query tile) for
//   dQ (7 GEMMs: S and dP are recomputed), when B * Hkv is too small to keep the threads busy.
// Both give bit-identical results: every dQ tile sums the same dS k products in the same key order.
#include "attention/attention.h"
#include "attention/tiles.h"

namespace fr::FR_ISA_NS {
using namespace attn;

namespace {
template <class S>
struct Backward {
  using T = acc_t<S>;
  const AttnBwdParams& p;
  Geom g;
  T c;        // scale * log2(e)
  bool copy;  // rows must be converted / padded to (n, Dp) in the math type
  // scratch layout (T elements): per key tile, then per query tile
  int64_t o_kt, o_vt, o_kc, o_dk, o_dv, o_s, o_dp, o_qs, o_qc, o_doc, o_dq, o_delta, o_lse2, o_lse2lo, o_tmp,
      size;

  explicit Backward(const AttnBwdParams& p_)
      : p(p_),
        g(p_.B, p_.H, p_.Hkv, p_.Tq, p_.Tk, p_.D, p_.seg),
        c(T(p_.scale * 1.4426950408889634)),
        copy(needs_copy<S, T>(g)) {
    const int64_t rows_k = copy ? kBk * g.Dp : 0, rows_q = copy ? kBq * g.Dp : 0;
    int64_t o = 0;
    auto take = [&](int64_t n) { return std::exchange(o, o + n); };
    o_kt = take(g.D * kBk), o_vt = take(g.D * kBk), o_kc = take(rows_k), o_dk = take(kBk * g.Dp);
    o_dv = take(kBk * g.Dp), o_s = take(kBq * kBk), o_dp = take(kBq * kBk), o_qs = take(kBq * g.D),
    o_qc = take(rows_q);
    o_doc = take(rows_q), o_dq = take(kBq * g.Dp), o_delta = take(kBq), o_lse2 = take(kBq),
    o_lse2lo = take(kBq), o_tmp = take(g.Dp);
    size = o;
  }

  // Key tile j0 of (b, kv head) bk: K^T, V^T (D, kBk) and K rows (kn, Dp) in the math type.
  const T* load_keys(int64_t bk, int64_t j0, int64_t kn, T* w) const {
    const S* k = static_cast<const S*>(p.k) + (bk * g.Tk + j0) * g.D;  // (kn, D)
    pack_transposed(k, kn, g.D, w + o_kt);
    pack_transposed(static_cast<const S*>(p.v) + (bk * g.Tk + j0) * g.D, kn, g.D, w + o_vt);
    return padded_rows(g, k, kn, w + o_kc);
  }

  // Query tile qi of head bh: returns q rows and fills dO rows (M, Dp), the forward's scaled rows
  // c q (M, D), Delta, and lse * log2 e as hi + lo in the math type.
  const T* load_queries(const QTile& qi, int64_t bh, T* w, const T** dor) const {
    const int64_t row0 = bh * g.Tq + qi.i0;
    const S* q = static_cast<const S*>(p.q) + row0 * g.D;  // (M, D)
    load_row(q, w + o_qs, qi.M * g.D, c);
    const T* qr = padded_rows(g, q, qi.M, w + o_qc);
    *dor = padded_rows(g, static_cast<const S*>(p.dout) + row0 * g.D, qi.M, w + o_doc);
    const S* o = static_cast<const S*>(p.out) + row0 * g.D;  // (M, D)
    const double* lse = p.lse + row0;                        // (M,)
    for (int64_t r = 0; r < qi.M; ++r) {
      load_row(o + r * g.D, w + o_tmp, g.D, T(1));
      w[o_delta + r] = dot(*dor + r * g.Dp, w + o_tmp, g.D);
      const double lse2 = lse[r] * 1.4426950408889634;
      w[o_lse2 + r] = T(lse2);
      w[o_lse2lo + r] = T(lse2 - double(T(lse2)));
    }
    return qr;
  }

  // P, then dS, into the S scratch (M, kBk); with dv, also dV += P^T dO. Padded and masked
  // columns end up 0. P = exp2(S - hi - lo) with S = (c q) k^T computed exactly as the forward did:
  // at logits ~100 any other rounding of S (or of lse) is an fp32 error of ~1e-5 relative in P.
  void probs_and_grad(const QTile& qi, int64_t b, int64_t j0, int64_t kn, Cover cov, const T* dor, T* w,
                      T* dv) const {
    const int64_t N = round8(kn), lim = diag_lim(qi, j0);
    const bool diag = cov == Cover::masked;  // diagonal tiles skip the blocks above the diagonal
    T *Sc = w + o_s, *dP = w + o_dp;
    gemm(qi.M, N, g.D, w + o_qs, g.D, 1, w + o_kt, kBk, Sc, kBk, false, diag ? Tri::cols : Tri::none,
         lim);  // S = (c q) k^T
    for (int64_t r = 0; r < qi.M; ++r) {
      const int64_t Nr = diag ? row_cols(r, lim, kn) : N;
      exp2_sub2(Sc + r * kBk, Nr, w[o_lse2 + r], w[o_lse2lo + r]);
      std::fill(Sc + r * kBk + Nr, Sc + (r + 1) * kBk, T(0));
    }
    // masked entries of S are finite (of any sign): mask P
    if (diag) apply_mask(g, qi, b, j0, kn, Sc, kBk, N, T(0));
    if (dv)
      gemm(kn, g.Dp, qi.M, Sc, 1, kBk, dor, g.Dp, dv, g.Dp, true, diag ? Tri::k_lo : Tri::none,
           lim);  // dV += P^T dO
    gemm(qi.M, N, g.D, dor, g.Dp, 1, w + o_vt, kBk, dP, kBk, false, diag ? Tri::cols : Tri::none,
         lim);  // dP = dO v^T
    for (int64_t r = 0; r < qi.M; ++r)
      softmax_grad(Sc + r * kBk, dP + r * kBk, diag ? row_cols(r, lim, kn) : N, w[o_delta + r]);
  }

  // dK, dV of key tile j0 of bk over the group's query heads; with dq_acc ((G, Tq, Dp) for bk),
  // also dQ += dS k (the one-pass schedule).
  void key_tile(int64_t bk, int64_t j0, T* w, T* dq_acc) const {
    const int64_t b = bk / g.Hkv, kn = std::min(kBk, g.Tk - j0);
    const T* kr = load_keys(bk, j0, kn, w);  // (kn, Dp)
    T *dK = w + o_dk, *dV = w + o_dv;        // (kn, Dp) each
    std::fill(dK, dK + kBk * g.Dp, T(0));
    std::fill(dV, dV + kBk * g.Dp, T(0));
    for (int64_t hh = 0; hh < g.G; ++hh) {
      const int64_t bh = b * g.H + (bk % g.Hkv) * g.G + hh;
      for (int64_t qt = std::max<int64_t>(0, (j0 - g.off) / kBq); qt < g.nQt; ++qt) {
        const QTile qi = q_tile(g, b, qt);
        const Cover cov = cover(g, qi, b, j0, kn);
        if (cov == Cover::none) continue;
        const T* dor;
        const T* qr = load_queries(qi, bh, w, &dor);  // (M, Dp) each
        probs_and_grad(qi, b, j0, kn, cov, dor, w, dV);
        const bool diag = cov == Cover::masked;
        const int64_t lim = diag_lim(qi, j0);
        gemm(kn, g.Dp, qi.M, w + o_s, 1, kBk, qr, g.Dp, dK, g.Dp, true, diag ? Tri::k_lo : Tri::none,
             lim);  // dK += dS^T q
        if (dq_acc) {
          T* dq = dq_acc + (hh * g.Tq + qi.i0) * g.Dp;  // (M, Dp)
          gemm(qi.M, g.Dp, kn, w + o_s, kBk, 1, kr, g.Dp, dq, g.Dp, true, diag ? Tri::k_hi : Tri::none,
               lim);  // dQ += dS k
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

  // dQ of query tile qt of head bh (the second pass of the two-pass schedule).
  void query_tile(int64_t bh, int64_t qt, T* w) const {
    const int64_t b = bh / g.H, bk = b * g.Hkv + (bh % g.H) / g.G;
    const QTile qi = q_tile(g, b, qt);
    const T* dor;
    const T* qr = load_queries(qi, bh, w, &dor);  // (M, Dp) each
    T* dQ = w + o_dq;                             // (M, Dp)
    std::fill(dQ, dQ + qi.M * g.Dp, T(0));
    for (int64_t j0 = 0; j0 <= qi.p_last; j0 += kBk) {
      const int64_t kn = std::min(kBk, g.Tk - j0);
      const Cover cov = cover(g, qi, b, j0, kn);
      if (cov == Cover::none) continue;
      const T* kr = load_keys(bk, j0, kn, w);  // (kn, Dp)
      probs_and_grad(qi, b, j0, kn, cov, dor, w, nullptr);
      gemm(qi.M, g.Dp, kn, w + o_s, kBk, 1, kr, g.Dp, dQ, g.Dp, true,
           cov == Cover::masked ? Tri::k_hi : Tri::none, diag_lim(qi, j0));  // dQ += dS k
    }
    S* dq = static_cast<S*>(p.dq) + (bh * g.Tq + qi.i0) * g.D;  // (M, D)
    for (int64_t r = 0; r < qi.M; ++r) store_row(dQ + r * g.Dp, dq + r * g.D, g.D, T(p.scale));
  }
};
}  // namespace

template <class S>
static void attention_bwd(const AttnBwdParams& p) {
  using T = acc_t<S>;
  const Backward<S> bw(p);
  const Geom& g = bw.g;
  const int64_t BK = g.B * g.Hkv, threads = std::max(1, num_threads());
  // One pass: BK equal tasks of 5 GEMM units in ceil(BK / threads) rounds; two passes: 7 units, balanced.
  const int64_t rounds = (BK + threads - 1) / threads;
  if (rounds * threads * 5 < BK * 7) {
    run_tasks<T>(BK, bw.size + g.G * g.Tq * g.Dp, 2.5 * attn_flops(g), [&](int64_t bk, T* w) {
      T* dq_acc = w + bw.size;  // (G, Tq, Dp)
      std::fill(dq_acc, dq_acc + g.G * g.Tq * g.Dp, T(0));
      for (int64_t j0 = 0; j0 < g.Tk; j0 += kBk) bw.key_tile(bk, j0, w, dq_acc);
      S* dq = static_cast<S*>(p.dq) + bk * g.G * g.Tq * g.D;  // (G * Tq, D)
      for (int64_t r = 0; r < g.G * g.Tq; ++r) store_row(dq_acc + r * g.Dp, dq + r * g.D, g.D, T(p.scale));
    });
    return;
  }
  // Low key tiles see the most queries and late query tiles the most keys: largest tasks first.
  run_tasks<T>(g.nKt * BK, bw.size, 2 * attn_flops(g),
               [&](int64_t t, T* w) { bw.key_tile(t % BK, (t / BK) * kBk, w, nullptr); });
  const int64_t BH = g.B * g.H;
  run_tasks<T>(g.nQt * BH, bw.size, 1.5 * attn_flops(g),
               [&](int64_t t, T* w) { bw.query_tile(t % BH, g.nQt - 1 - t / BH, w); });
}

void attention_bwd_cpu(const AttnBwdParams& p) { FR_DISPATCH_FLOAT(p.dtype, attention_bwd<scalar_t>(p)); }

}  // namespace fr::FR_ISA_NS
