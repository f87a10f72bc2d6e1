// The sampler, one row per task, never sorting the vocabulary. What a row costs depends on its filters:
// - greedy, top-k <= 1024, no filter at all, and top-p alone (first try): one fused pass (fused.h) gives
//   the max, the NaN/inf flags, Z = sum of e = 2^((x - max) log2(e) / T) and group maxima, from which the
//   top-k candidates are gathered; top-p walks the candidates sorted; the token is drawn by inverse CDF
//   over the allowed candidates (over the whole row, e recomputed, for an unfiltered row).
// - else (top-p over many tokens, top-k > 1024, min-p alone): pass 1 (max, flags, streamed top-k);
//   pass 2 stores e and a histogram of probabilities, of which only top-p's boundary bucket is sorted;
//   pass 3 draws by inverse CDF over {x >= tau, e >= min_p}.
// Scratch is O(V) per thread; a row's uniform is Philox(seed, row), so the thread count does not matter.
#include "sample/sample.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/philox.h"
#include "sample/draw.h"
#include "sample/fused.h"
#include "sample/passes.h"

namespace fr::FR_ISA_NS {
namespace {
using namespace sampling;

constexpr int64_t kSmallK = 1024;   // top-p over at most this many top-k survivors: sort them
constexpr int64_t kNucleus = 256;   // top-p alone: first look for the boundary among this many tokens
constexpr double kFlat = 32;        // ... unless the row's inverse Simpson index exceeds this

template <class T> struct Scratch {
  std::vector<T> xs;               // (V,) a bf16/f16 row converted to float
  std::vector<T> e;                // (V,) 2^((x - max) * log2(e) / T) = p / p_max
  std::vector<uint16_t> bucket;    // (V,) histogram bucket of each token (top-p histogram path)
  std::vector<double> hist;        // (kBuckets + kSpare,) mass per bucket, + spare slots
  std::vector<double> block;       // (ceil(V / 64),) allowed mass per block
  std::vector<Cand<T>> cand, sel;  // top-k candidates; the tokens of the top-p boundary bucket
  TopK<T> topk;
};

// Top-p over tokens sorted best first: keeps group after group of equal logits while the mass of the
// tokens strictly more likely than the group (C, from `above`) is < target; returns the last kept logit
// and sets *found when the walk stopped there (C >= target) rather than at the end of `c`.
template <class T> T walk_groups(const std::vector<Cand<T>>& c, double above, double target, bool* found) {
  T tau = c[0].x;
  double C = above;
  for (size_t i = 0; i < c.size() && C < target;) {
    const T gx = c[i].x;
    for (; i < c.size() && c[i].x == gx; ++i) C += double(c[i].e);
    tau = gx;
  }
  if (found) *found = C >= target;
  return tau;
}

// Top-p over the whole row from the histogram filled by the softmax pass: the boundary lies in the
// last non-empty bucket whose mass above is < target; only that bucket's tokens are sorted.
template <class T> T topp_histogram(const T* x, const T* e, int64_t V, double target, Scratch<T>& s) {
  double C = 0, above = 0;
  int at = 0;
  for (int b = 0; b < kBuckets && C < target; ++b) {
    if (s.hist[size_t(b)] == 0) continue;
    at = b;
    above = C;
    C += s.hist[size_t(b)];
  }
  collect_bucket(x, e, s.bucket.data(), V, at, s.sel);
  std::sort(s.sel.begin(), s.sel.end(), better<T>);
  return walk_groups(s.sel, above, target, nullptr);
}

// Every survivor x >= vk becomes a candidate, in index order, with its e (survivors tied at vk that the
// top-k buffer left out are gathered again); returns their mass.
template <class T> double prepare_candidates(const T* x, int64_t V, const Scan<T>& r, T c, std::vector<Cand<T>>& cand) {
  if (r.tied > 0 && r.vk > -std::numeric_limits<T>::infinity()) {
    cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const Cand<T>& t) { return t.x == r.vk; }), cand.end());
    collect_equal(x, V, r.vk, cand);
    std::sort(cand.begin(), cand.end(), [](const Cand<T>& a, const Cand<T>& b) { return a.i < b.i; });
  }
  double mass = 0;
  for (auto& t : cand) {
    t.e = exp2((t.x - r.m) * c);
    mass += double(t.e);
  }
  return mass;
}

// Top-p over the candidates, walked in a copy sorted by logit.
template <class T> T topp_candidates(Scratch<T>& s, double target, bool* found) {
  s.sel.assign(s.cand.begin(), s.cand.end());
  std::sort(s.sel.begin(), s.sel.end(), [](const Cand<T>& a, const Cand<T>& b) { return a.x > b.x; });
  return walk_groups(s.sel, 0.0, target, found);
}

// Inverse CDF over the allowed candidates {x >= tau, e >= thr} in index order, like sample_scan (the
// same token for the same u).
template <class T> int64_t draw_candidates(const std::vector<Cand<T>>& cand, T tau, T thr, double u) {
  double total = 0;
  for (const auto& t : cand) total += t.x >= tau && t.e >= thr ? double(t.e) : 0.0;
  const double target = u * total;
  double cum = 0;
  int64_t last = -1;
  for (const auto& t : cand) {
    if (!(t.x >= tau && t.e >= thr) || t.e == 0) continue;
    cum += double(t.e);
    last = t.i;
    if (cum > target) return last;
  }
  return last;  // rounding left u * total unreached: the last allowed token
}

// Rows whose allowed set may be most of the vocabulary: e stored, the top-p boundary from a histogram,
// the token by sample_scan. z_known > 0 is the row's Z when the caller has it (the histogram's cut is
// then final from the start). Returns the token; *Z gets the row's sum.
template <class T>
int64_t sample_full_row(const T* x, int64_t V, T m, T c, T vk, double top_p, T thr, double u, double z_known,
                        Scratch<T>& s, double* Z) {
  s.e.resize(size_t(V));
  T* e = s.e.data();
  if (!(top_p < 1)) {
    *Z = softmax_pass<true, false>(x, V, m, c, vk, T(0), false, e, nullptr, nullptr).Z;
    return sample_scan(x, e, V, vk, thr, u, s.block);
  }
  // Survivors with d2 < cut weigh < V * 2^cut <= (1 - top_p) * Zk / 4 in all for any cut <= cut0 +
  // log2(Zk) (Zk >= 1: the max has e = 1), so the top-p boundary, where the mass above reaches
  // top_p * Zk, lies above them: the histogram may skip them. Without a known Z the pass raises its
  // cut from cut0 as the survivor mass it has seen grows; buckets straddling the final cut may miss
  // tokens below it, but the walk stops at the boundary before reaching them.
  const double cut0 = std::log2((1.0 - top_p) / (4.0 * double(V)));
  s.bucket.resize(size_t(V));
  s.hist.assign(kBuckets + kSpare, 0.0);
  const Sums z = z_known > 0 ? softmax_pass<true, true>(x, V, m, c, vk, T(cut0 + std::log2(z_known)), false, e,
                                                        s.bucket.data(), s.hist.data())
                             : softmax_pass<true, true>(x, V, m, c, vk, T(cut0), true, e, s.bucket.data(),
                                                        s.hist.data());
  *Z = z.Z;
  return sample_scan(x, e, V, topp_histogram(x, e, V, top_p * z.Zk, s), thr, u, s.block);
}

// The smallest T value t with double(t) >= min_p, so that e >= t <=> double(e) >= min_p.
template <class T> T min_p_threshold(double min_p) {
  T t = T(min_p);
  if (double(t) < min_p) t = std::nextafter(t, std::numeric_limits<T>::infinity());
  return t;
}

template <class T> uint8_t row_status(const Scan<T>& r) {
  return r.nan ? kRowNaN : r.pinf ? kRowPosInf : r.m == -std::numeric_limits<T>::infinity() ? kRowAllNegInf : kRowOk;
}

template <class T> void sample_row(const SampleParams& p, int64_t b, const T* x, Scratch<T>& s) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr double kLog2e = 1.4426950408889634;
  const int64_t V = p.V;
  const double temp = p.temperature[b], top_p = p.top_p[b];
  const int64_t k = temp > 0 && p.top_k[b] < V ? p.top_k[b] : 0;
  // 1 / T is capped so that a tiny temperature cannot make 0 * inf = NaN at the max.
  const double inv_t = temp > 0 ? std::min(1.0 / temp, std::numeric_limits<double>::max()) : 1.0;
  const T c = T(std::min(inv_t * kLog2e, double(std::numeric_limits<T>::max())));  // e = 2^((x - max) * c)
  const T thr = min_p_threshold<T>(p.min_p[b]);  // p_i >= min_p * p_max <=> e_i >= min_p (e_max = 1)
  const double u = philox_uniform(p.seed, uint64_t(b), 0);
  auto bad = [&](uint8_t status) {
    p.status[b] = status;
    p.tokens[b] = 0;
    p.logprobs[b] = std::numeric_limits<float>::quiet_NaN();
  };
  double Z;
  int64_t tok;
  T m;
  // Top-p without top-k first looks for the boundary among the kNucleus most likely tokens: when it is
  // there, the row needs no stored e and no histogram. Rows where Z^2 / sum(e^2) (the inverse Simpson
  // index: how many tokens hold most of the mass) exceeds kFlat skip the attempt: their long tails put
  // the nucleus far beyond kNucleus tokens.
  const bool plain = k == 0 && top_p >= 1 && thr == 0;
  const bool nucleus_first = k == 0 && top_p < 1 && V >= 16 * kNucleus;
  if (temp == 0 || (k > 0 && k <= kSmallK) || plain || nucleus_first) {  // one fused pass over the row
    const ScanSum<T> r = nucleus_first ? scan_softmax<true>(x, V, kNucleus, c, s.topk, s.cand)
                                       : scan_softmax(x, V, k, c, s.topk, s.cand);
    if (const uint8_t st = row_status(r)) return bad(st);
    m = r.m;
    Z = r.Z;
    if (temp == 0) {
      tok = std::find(x, x + V, r.m) - x;  // greedy: the first argmax, its log-prob at T = 1
    } else if (plain) {
      tok = sample_plain(x, V, m, c, Z, u);
    } else if (nucleus_first) {
      bool found = false;
      if (!(r.S2 > 0 && r.Z * r.Z > kFlat * r.S2)) {
        Scan<T> top = r;
        top.vk = finish_deferred_top_k(x, V, kNucleus, r, s.topk, s.cand);
        prepare_candidates(x, V, top, c, s.cand);
        const T tau = topp_candidates(s, top_p * Z, &found);
        if (found) tok = draw_candidates(s.cand, tau, thr, u);
      }
      double unused;
      if (!found) tok = sample_full_row(x, V, m, c, -inf, top_p, thr, u, Z, s, &unused);
    } else {  // small top-k: every survivor is a candidate
      const double Zk = prepare_candidates(x, V, r, c, s.cand);  // the top-k renormalisation
      const T tau = top_p < 1 ? topp_candidates(s, top_p * Zk, nullptr) : r.vk;
      tok = draw_candidates(s.cand, tau, thr, u);
    }
  } else {
    const Scan<T> r = scan_row(x, V, k, s.topk, s.cand);
    if (const uint8_t st = row_status(r)) return bad(st);
    m = r.m;
    tok = sample_full_row(x, V, m, c, k ? r.vk : -inf, top_p, thr, u, 0.0, s, &Z);
  }
  p.status[b] = kRowOk;
  p.tokens[b] = tok;
  p.logprobs[b] = float((double(x[tok]) - double(m)) * inv_t - std::log(Z));
}

template <class In> void convert_row(const In* in, int64_t V, float* out) {  // in, out (V,)
  int64_t i = 0;
#if defined(FR_HAVE_AVX2)
  for (; i + 8 <= V; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    __m256 v;
    if constexpr (std::is_same_v<In, bf16_t>) v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else v = _mm256_cvtph_ps(h);
    _mm256_storeu_ps(out + i, v);
  }
#endif
  for (; i < V; ++i) out[i] = to_acc(in[i]);
}

template <class In> void sample_rows(const SampleParams& p, int64_t b0, int64_t b1) {
  using T = acc_t<In>;
  Scratch<T> s;
  for (int64_t b = b0; b < b1; ++b) {
    const In* in = static_cast<const In*>(p.logits) + b * p.V;  // (V,)
    const T* x;
    if constexpr (std::is_same_v<In, T>) {
      x = in;
    } else {
      s.xs.resize(size_t(p.V));
      convert_row(in, p.V, s.xs.data());
      x = s.xs.data();
    }
    sample_row<T>(p, b, x, s);
  }
}

}  // namespace

void sample_cpu(const SampleParams& p) {
  // A row of V tokens is ~10 V flops: rows are the tasks, batched when they are short.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.V);
  FR_DISPATCH_FLOAT(p.dtype, parallel_for(0, p.B, grain, [&](int64_t b0, int64_t b1) {
    sample_rows<scalar_t>(p, b0, b1);
  }));
}

}  // namespace fr::FR_ISA_NS
