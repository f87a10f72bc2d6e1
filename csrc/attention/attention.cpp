// Attention forward: one task per (b, h, query tile) walks the key tiles up to the diagonal with an
// online softmax (FlashAttention-2, arXiv 2307.08691, alg. 1), so no (T, T) buffer exists.
// Scores are kept in log2 units (q pre-multiplied by scale * log2 e) so the softmax needs only exp2.
#include "attention/attention.h"

#include "attention/tiles.h"

namespace fr::FR_ISA_NS {
using namespace attn;

// Query tiles of at most this many rows (decode steps) take scores by dot products with the key rows.
constexpr int64_t kFewRows = 4;

template <class S>
static void attention_fwd(const AttnFwdParams& p) {
  using T = acc_t<S>;
  const Geom g(p.B, p.H, p.Hkv, p.Tq, p.Tk, p.D, p.seg);
  const S* q = static_cast<const S*>(p.q);      // (B, H, Tq, D)
  const S* k = static_cast<const S*>(p.k);      // (B, Hkv, Tk, D), planes kv_plane apart
  const S* v = static_cast<const S*>(p.v);      // (B, Hkv, Tk, D), planes kv_plane apart
  S* out = static_cast<S*>(p.out);              // (B, H, Tq, D)
  double* lse = p.lse;                          // (B, H, Tq)
  const T c = T(p.scale * 1.4426950408889634);  // scale * log2(e)
  const int64_t nv = needs_copy<S, T>(g) ? kBk * g.Dp : 0;

  // scratch: Q (kBq, D) | K^T (D, kBk) or K (kBk, Dp) | V (kBk, Dp) if converted | S (kBq, kBk) |
  //          O (kBq, Dp) | m, l (kBq)
  const int64_t n_scratch = kBq * g.D + kBk * g.Dp + nv + kBq * kBk + kBq * g.Dp + 2 * kBq;
  const int64_t BH = g.B * g.H;
  run_tasks<T>(g.nQt * BH, n_scratch, attn_flops(g), [&](int64_t t, T* scratch) {
    const int64_t qt = g.nQt - 1 - t / BH, bh = t % BH;  // longest rows first
    const int64_t b = bh / g.H, bk = b * g.Hkv + (bh % g.H) / g.G;
    const QTile qi = q_tile(g, b, qt);
    T* Qs = scratch;          // (M, D)
    T* Kt = Qs + kBq * g.D;   // (D, kBk), or (kBk, Dp) for few rows
    T* Vc = Kt + kBk * g.Dp;  // (kBk, Dp)
    T* Sc = Vc + nv;          // (M, kBk)
    T* O = Sc + kBq * kBk;    // (M, Dp)
    T* m = O + kBq * g.Dp;    // (M,)
    T* l = m + kBq;           // (M,)
    load_row(q + (bh * g.Tq + qi.i0) * g.D, Qs, qi.M * g.D, c);
    std::fill(O, O + qi.M * g.Dp, T(0));
    std::fill(m, m + qi.M, -std::numeric_limits<T>::infinity());
    std::fill(l, l + qi.M, T(0));
    for (int64_t j0 = 0; j0 <= qi.p_last; j0 += kBk) {
      const int64_t kn = std::min(kBk, g.Tk - j0), N = round8(kn);
      const Cover cov = cover(g, qi, b, j0, kn);
      if (cov == Cover::none) continue;
      // diagonal tiles skip the blocks above the diagonal in both GEMMs
      const Tri tri_s = cov == Cover::masked ? Tri::cols : Tri::none,
                tri_o = cov == Cover::masked ? Tri::k_hi : Tri::none;
      const int64_t lim = diag_lim(qi, j0);
      const S* kr = k + bk * p.kv_plane + j0 * g.D;  // (kn, D)
      if (qi.M <= kFewRows) {  // decode: dot products with the key rows; columns >= kn are masked
        gemm_nt(qi.M, kn, g.D, Qs, g.D, padded_rows(g, kr, kn, Kt), g.Dp, Sc, kBk);
      } else {
        pack_transposed(kr, kn, g.D, Kt);
        gemm(qi.M, N, g.D, Qs, g.D, 1, Kt, kBk, Sc, kBk, false, tri_s, lim);  // S = (c q) k^T
      }
      if (cov == Cover::masked) apply_mask(g, qi, b, j0, kn, Sc, kBk, N, -std::numeric_limits<T>::infinity());
      for (int64_t r = 0; r < qi.M; ++r) {
        T* s = Sc + r * kBk;  // (N,)
        const int64_t Nr = cov == Cover::masked ? row_cols(r, lim, kn) : N;
        std::fill(s + Nr, s + N, T(0));  // P = 0 past what the row sees
        if (Nr == 0) continue;
        const T m_new = std::max(m[r], row_max(s, Nr));
        // A row that has seen no key yet keeps m = -inf; subtracting 0 then gives P = 0, not NaN.
        const T m_use = m_new == -std::numeric_limits<T>::infinity() ? T(0) : m_new;
        const T row_sum = exp2_sub_sum(s, Nr, m_use);
        if (m_new != m[r] && l[r] != T(0)) {
          const T alpha = exp2(m[r] - m_use);
          l[r] *= alpha;
          scale_row(O + r * g.Dp, g.Dp, alpha);
        }
        l[r] += row_sum;
        m[r] = m_new;
      }
      const T* vt = padded_rows(g, v + bk * p.kv_plane + j0 * g.D, kn, Vc);     // (kn, Dp)
      gemm(qi.M, g.Dp, kn, Sc, kBk, 1, vt, g.Dp, O, g.Dp, true, tri_o, lim);  // O += P v
    }
    for (int64_t r = 0; r < qi.M; ++r) {  // every row sees at least its own key, so l > 0
      const int64_t row = bh * g.Tq + qi.i0 + r;
      store_row(O + r * g.Dp, out + row * g.D, g.D, T(1) / l[r]);
      // m + log2 l is exact in fp64: the backward's P = exp2(S - lse) then carries no rounding of
      // lse, which at logits ~100 would cost fp32 an error of ~1e-5 relative.
      lse[row] = (double(m[r]) + std::log2(double(l[r]))) * 0.6931471805599453;
    }
  });
}

void attention_fwd_cpu(const AttnFwdParams& p) { FR_DISPATCH_FLOAT(p.dtype, attention_fwd<scalar_t>(p)); }

}  // namespace fr::FR_ISA_NS
