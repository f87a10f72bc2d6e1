// The sampler, one row per task, without sorting the vocabulary: pass 1 finds the max, bad values and
// the top-k threshold (a filtered candidate buffer); pass 2 writes e = exp((x - max) / T) and the
// sums; the top-p boundary is found among the top-k candidates (k <= 1024, sorted) or else in one
// bucket of a probability histogram; pass 3 draws the token by inverse CDF over the allowed set.
// Scratch is O(V) per thread; rows are independent, so results do not depend on the thread count.
#include "sample/sample.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/philox.h"
#include "sample/passes.h"

namespace fr::FR_ISA_NS {
namespace {
using namespace sampling;

constexpr int64_t kSmallK = 1024;  // top-p over at most this many top-k survivors: sort them

template <class T> struct Scratch {
  std::vector<T> xs;               // (V,) a bf16/f16 row converted to float
  std::vector<T> e;                // (V,) exp((x - max) / T)
  std::vector<uint16_t> bucket;    // (V,) histogram bucket of each token (top-p histogram path)
  std::vector<double> hist;        // (kBuckets,) mass per bucket
  std::vector<double> block;       // (ceil(V / 64),) allowed mass per block
  std::vector<Cand<T>> cand, sel;  // top-k candidates; the tokens of the top-p boundary bucket
};

// Top-p over tokens sorted best first: keeps group after group of equal logits while the mass of the
// tokens strictly more likely than the group (C, from `above`) is < target; returns the last kept
// logit. The group at logit `vk` has `n_vk` members in the row (some may be missing from `c`).
template <class T>
T walk_groups(const std::vector<Cand<T>>& c, const T* e, double above, double target, T vk, int64_t n_vk) {
  T tau = c[0].x;
  double C = above;
  for (size_t i = 0; i < c.size() && C < target;) {
    const T gx = c[i].x;
    double mass = 0;
    size_t j = i;
    for (; j < c.size() && c[j].x == gx; ++j) mass += double(e[c[j].i]);
    if (n_vk >= 0 && gx == vk) mass = double(n_vk) * double(e[c[i].i]);  // equal logits, equal e
    tau = gx;
    C += mass;
    i = j;
  }
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
  collect_bucket(x, s.bucket.data(), V, at, s.sel);
  std::sort(s.sel.begin(), s.sel.end(), better<T>);
  return walk_groups(s.sel, e, above, target, T(0), -1);
}

// Inverse CDF over the allowed candidates, in index order like sample_scan (same token for same u).
template <class T> int64_t sample_cands(std::vector<Cand<T>>& c, const T* e, T tau, T thr, double u) {
  size_t n = 0;  // c is sorted best first, so the tokens with x >= tau are a prefix
  while (n < c.size() && c[n].x >= tau) ++n;
  std::sort(c.begin(), c.begin() + std::ptrdiff_t(n), [](const Cand<T>& a, const Cand<T>& b) { return a.i < b.i; });
  double total = 0;
  for (size_t j = 0; j < n; ++j) total += e[c[j].i] >= thr ? double(e[c[j].i]) : 0.0;
  const double target = u * total;
  double cum = 0;
  int64_t last = c[0].i;
  for (size_t j = 0; j < n; ++j) {
    const T w = e[c[j].i];
    if (!(w >= thr) || w == 0) continue;
    cum += double(w);
    last = c[j].i;
    if (cum > target) return last;
  }
  return last;  // rounding left u * total unreached: the last allowed token
}

// The smallest T value t with double(t) >= min_p, so that e >= t <=> double(e) >= min_p.
template <class T> T min_p_threshold(double min_p) {
  T t = T(min_p);
  if (double(t) < min_p) t = std::nextafter(t, std::numeric_limits<T>::infinity());
  return t;
}

template <bool kTopK, class T>
Sums softmax(bool hist, const T* x, int64_t V, T m, T inv_t, T vk, T d_cut, Scratch<T>& s) {
  if (!hist) return softmax_pass<kTopK, false>(x, V, m, inv_t, vk, d_cut, s.e.data(), nullptr, nullptr);
  s.bucket.resize(size_t(V));
  s.hist.assign(kBuckets, 0.0);
  return softmax_pass<kTopK, true>(x, V, m, inv_t, vk, d_cut, s.e.data(), s.bucket.data(), s.hist.data());
}

template <class T> void sample_row(const SampleParams& p, int64_t b, const T* x, Scratch<T>& s) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const int64_t V = p.V;
  const double temp = p.temperature[b], top_p = p.top_p[b];
  const int64_t k = temp > 0 && p.top_k[b] < V ? p.top_k[b] : 0;
  const Scan<T> r = scan_row(x, V, k, s.cand);
  p.status[b] = r.nan ? kRowNaN : r.pinf ? kRowPosInf : r.m == -inf ? kRowAllNegInf : kRowOk;
  if (p.status[b] != kRowOk) {
    p.tokens[b] = 0;
    p.logprobs[b] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  s.e.resize(size_t(V));
  const T* e = s.e.data();
  if (temp == 0) {  // greedy: the first argmax, its log-prob at temperature 1
    const Sums z = softmax<false>(false, x, V, r.m, T(1), -inf, -inf, s);
    p.tokens[b] = std::find(x, x + V, r.m) - x;
    p.logprobs[b] = float(-std::log(z.Z));
    return;
  }
  // 1 / T is capped so that a tiny temperature cannot make 0 * inf = NaN at the max.
  const double inv_t = std::min(1.0 / temp, double(std::numeric_limits<T>::max()));
  const bool small_k = k > 0 && k <= kSmallK, hist = top_p < 1 && !small_k;
  // Survivors with d < d_cut weigh < V * e^d_cut = (1 - top_p) / 4 <= (1 - top_p) * Zk / 4 in all
  // (Zk >= 1: the max has e = 1), so the top-p boundary lies above them: the histogram skips them.
  const T d_cut = hist ? T(std::log((1.0 - top_p) / (4.0 * double(V)))) : -inf;
  const Sums z = k ? softmax<true>(hist, x, V, r.m, T(inv_t), r.vk, d_cut, s)
                   : softmax<false>(hist, x, V, r.m, T(inv_t), -inf, d_cut, s);
  T tau = k ? r.vk : -inf;
  bool in_cand = false;  // every allowed token is in s.cand
  if (small_k) {
    std::sort(s.cand.begin(), s.cand.end(), better<T>);
    int64_t n_gt = 0;
    for (const auto& c : s.cand) n_gt += c.x > r.vk;
    const int64_t n_vk = z.n_ge - n_gt;  // survivors tied at vk, in the buffer or not
    if (top_p < 1) tau = walk_groups(s.cand, e, 0.0, top_p * z.Zk, r.vk, n_vk);
    in_cand = tau > r.vk || n_vk == int64_t(s.cand.size()) - n_gt;
  } else if (hist) {
    tau = topp_histogram(x, e, V, top_p * z.Zk, s);
  }
  const T thr = min_p_threshold<T>(p.min_p[b]);  // p_i >= min_p * p_max <=> e_i >= min_p (e_max = 1)
  const double u = philox_uniform(p.seed, uint64_t(b), 0);
  const int64_t tok = in_cand ? sample_cands(s.cand, e, tau, thr, u) : sample_scan(x, e, V, tau, thr, u, s.block);
  p.tokens[b] = tok;
  p.logprobs[b] = float((double(x[tok]) - double(r.m)) * inv_t - std::log(z.Z));
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
