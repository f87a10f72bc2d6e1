// Pass 1 and the softmax sum in one read of the row, for rows that need no stored e (greedy, small
// top-k): the row's DRAM latency then hides under the exp work instead of adding to it. Each SIMD lane
// keeps its own running max and sum of 2^((x - lane max) * c); a lane's sum is rescaled (in double)
// when its max rises, which happens ~ln(V / 8) times per lane, and the lanes are merged at the end.
// Included by sample.cpp only, inside its ISA namespace.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "sample/passes.h"

namespace fr::FR_ISA_NS::sampling {

template <class T> struct ScanSum : Scan<T> {
  double Z;       // sum over the row of e = 2^((x - m) * c)
  double S2 = 0;  // sum of e^2 (kNucleus mode of the AVX2 pass only; else 0)
};

#if defined(FR_HAVE_AVX2)
// Lanes whose max rose (bits of `rose`) get their sum scaled by 2^((old max - new max) * c) and their
// sum of squares by its square, in double.
inline void rescale(__m256d (&z)[4], __m256 m_old, __m256 m_new, float c, unsigned rose) {
  alignas(32) double zl[16];
  alignas(32) float a[8], b[8];
  for (int q = 0; q < 4; ++q) _mm256_store_pd(zl + 4 * q, z[q]);
  _mm256_store_ps(a, m_old);
  _mm256_store_ps(b, m_new);
  for (; rose; rose &= rose - 1) {
    const int l = __builtin_ctz(rose);
    const double f = std::exp2((double(a[l]) - double(b[l])) * double(c));
    zl[l] *= f;
    zl[8 + l] *= f * f;
  }
  for (int q = 0; q < 4; ++q) z[q] = _mm256_load_pd(zl + 4 * q);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// Number of values >= t among v[0, n).
inline int64_t count_ge(const float* v, int64_t n, float t) {
  const __m256 vt = _mm256_set1_ps(t);
  __m256i c = _mm256_setzero_si256();
  int64_t i = 0, total = 0;
  for (; i + 8 <= n; i += 8)  // a true lane is -1
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(v + i), vt, _CMP_GE_OQ)));
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), c);
  for (int32_t x : l) total += x;
  for (; i < n; ++i) total += v[i] >= t;
  return total;
}

// Top-k from group maxima (topk.group_max: per chunk of 64 tokens, or per lane of a chunk = 8 tokens
// x[c + l + 8 j]): the k-th largest group max t0 is a lower bound of the k-th largest logit (those k
// maxima are k tokens >= t0), and a tight one when the groups outnumber k. Only chunks with a group max
// >= t0 can hold tokens >= t0; they are gathered and the k-th largest logit vk found among them.
// Every token >= vk, ties included, ends in `cand` (so topk.tied stays 0).
inline float select_via_group_max(const float* x, int64_t V, int64_t k, int group, TopK<float>& topk,
                                  std::vector<Cand<float>>& cand) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const float* gmax = topk.group_max.data();
  const int64_t n_groups = int64_t(topk.group_max.size()), n_chunks = V / kBlock, per_chunk = kBlock / group;
  // t0 by bisection on order-preserving float bits: the largest t with count(gmax >= t) >= k.
  uint32_t lo = TopK<float>::ordered(-inf), hi = TopK<float>::ordered(inf);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (count_ge(gmax, n_groups, TopK<float>::unordered(mid)) >= k) lo = mid;
    else hi = mid - 1;
  }
  const float t0 = TopK<float>::unordered(lo);
  // Gather x >= t0 (and > -inf, for t0 = -inf) through the buffer's compress, with t just below t0.
  const float t = std::max(std::nextafter(t0, -inf), -FLT_MAX);
  topk.t = t;
  topk.n = 0;
  topk.cap = size_t(V) + 1;  // no compaction: everything >= t0 is kept
  topk.reserve(size_t(V));
  for (int64_t j = 0; j < n_chunks; ++j)
    if (*std::max_element(gmax + j * per_chunk, gmax + (j + 1) * per_chunk) > t) topk.push_chunk(x, j * kBlock);
  for (int64_t i = n_chunks * kBlock; i < V; ++i) topk.push(x[i], i);
  cand.resize(topk.n);
  for (size_t j = 0; j < topk.n; ++j) cand[j] = {topk.bx[j], 0.0f, topk.bi[j]};
  if (int64_t(cand.size()) < k) return -inf;  // fewer than k finite logits: top-k keeps them all
  std::nth_element(topk.bx.begin(), topk.bx.begin() + (k - 1), topk.bx.begin() + std::ptrdiff_t(topk.n),
                   std::greater<float>());
  const float vk = topk.bx[size_t(k - 1)];
  cand.erase(std::remove_if(cand.begin(), cand.end(), [vk](const Cand<float>& c) { return c.x < vk; }), cand.end());
  return vk;
}

// kNucleus: also the sum of e^2, and a top-k selected from group maxima is left to the caller
// (select_via_group_max with topk.group), who may not need it.
template <bool kNucleus>
ScanSum<float> scan_softmax_avx2(const float* x, int64_t V, int64_t k, float c, TopK<float>& topk,
                                 std::vector<Cand<float>>& cand) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const int64_t n_chunks = V / kBlock;
  // Top-k: a small k is selected after the pass from the chunk maxima (select_via_chunk_max); a larger
  // one streams through the buffer tile by tile.
  // groups of 64 tokens (one max per chunk) or of 8 (one per lane of a chunk): t0 is tight when the
  // groups outnumber k at least twice.
  const int group = 2 * k <= n_chunks ? 64 : 8;
  const bool by_group_max = k > 0 && 2 * k <= n_chunks * (kBlock / group), streamed = k > 0 && !by_group_max;
  topk.reset(k);
  topk.group = by_group_max && kNucleus ? group : 0;  // nonzero: the selection is left to the caller
  topk.group_max.resize(size_t(n_chunks * (kBlock / group)));
  // Lane maxima start at the lowest finite float, not -inf, so that -inf logits give 2^-inf = 0, not NaN.
  __m256 vm = _mm256_set1_ps(-FLT_MAX), vbad = _mm256_setzero_ps();
  const __m256d zero = _mm256_setzero_pd();
  __m256d z[4] = {zero, zero, zero, zero};  // per-lane sums of e (lanes 0-3, 4-7), then of e^2
  const __m256 vc = _mm256_set1_ps(c), pinfv = _mm256_set1_ps(inf);
  int64_t i = 0;
  // Tiles of 16 chunks: first the max/exp work (no call in that loop, so every ymm value stays in a
  // register), then the top-k filter over the same 4 KiB, from L1.
  constexpr int64_t kTile = 16 * kBlock;
  for (int64_t end; (end = std::min(i + kTile, V - V % kBlock)) > i; i = end) {
    for (int64_t ci = i; ci < end; ci += kBlock) {
      __m256 lm = _mm256_set1_ps(-inf);  // this chunk's max per lane
      for (int64_t j = ci; j < ci + kBlock; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        lm = _mm256_max_ps(v, lm);  // a NaN v leaves lm as it was; NaN is flagged below
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v, pinfv, _CMP_NLT_UQ));  // NaN or +inf
      }
      if (by_group_max && group == kBlock) topk.group_max[size_t(ci / kBlock)] = hmax(lm);
      if (by_group_max && group == 8) _mm256_storeu_ps(topk.group_max.data() + ci / 8, lm);
      const __m256 cm = _mm256_max_ps(lm, vm);
      if (const unsigned rose = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(cm, vm, _CMP_GT_OQ))))
        rescale(z, vm, cm, c, rose);
      vm = cm;
      __m256 a = _mm256_setzero_ps(), a2 = a;  // float over one chunk, then double
      for (int64_t j = ci; j < ci + kBlock; j += 8) {
        const __m256 e = exp2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vc));
        a = _mm256_add_ps(a, e);
        if constexpr (kNucleus) a2 = _mm256_fmadd_ps(e, e, a2);
      }
      z[0] = _mm256_add_pd(z[0], lo_pd(a));
      z[1] = _mm256_add_pd(z[1], hi_pd(a));
      if constexpr (kNucleus) z[2] = _mm256_add_pd(z[2], lo_pd(a2)), z[3] = _mm256_add_pd(z[3], hi_pd(a2));
    }
    if (!streamed) continue;
    for (int64_t ci = i; ci < end; ci += kBlock) {
      const __m256 vt = _mm256_set1_ps(topk.t);
      __m256 ge = _mm256_setzero_ps();
      for (int64_t j = ci; j < ci + kBlock; j += 8)
        ge = _mm256_or_ps(ge, _mm256_cmp_ps(_mm256_loadu_ps(x + j), vt, _CMP_GE_OQ));
      if (_mm256_movemask_ps(ge)) topk.push_chunk(x, ci);
    }
  }
  alignas(32) float ml[8];
  alignas(32) double zl[16];
  _mm256_store_ps(ml, vm);
  for (int q = 0; q < 4; ++q) _mm256_store_pd(zl + 4 * q, z[q]);
  float m = *std::max_element(ml, ml + 8);
  double Z = 0, S2 = 0;
  for (int l = 0; l < 8; ++l) {
    if (!(zl[l] > 0)) continue;
    const double f = std::exp2((double(ml[l]) - double(m)) * double(c));
    Z += zl[l] * f;
    S2 += zl[8 + l] * f * f;
  }
  bool nan = false, pinf = false;
  if (_mm256_movemask_ps(vbad)) bad_values(x, i, nan, pinf);
  for (; i < V; ++i) {  // the last V % 64 tokens
    const float v = x[i];
    nan |= v != v;
    pinf |= v == inf;
    if (v > m) {
      const double f = std::exp2((double(m) - double(v)) * double(c));
      Z *= f;
      S2 *= f * f;
      m = v;
    }
    const double e = double(exp2((v - m) * c));
    Z += e;
    S2 += e * e;
    if (streamed) topk.push(v, i);
  }
  if (m == -FLT_MAX && std::none_of(x, x + V, [](float v) { return v > -inf; })) m = -inf;  // all -inf
  float vk = -inf;
  if (streamed) vk = topk.finish(cand);
  else if (by_group_max && !kNucleus) vk = select_via_group_max(x, V, k, group, topk, cand);
  return {{m, nan, pinf, vk, topk.tied}, Z, kNucleus ? S2 : 0.0};
}
#endif

// k > 0: also the top-k candidates, as scan_row. Without AVX2: scan_row, then the softmax sum.
// kNucleus (AVX2 float rows with group-max top-k): see scan_softmax_avx2; elsewhere S2 = 0 and the
// top-k is selected here.
template <bool kNucleus = false, class T>
ScanSum<T> scan_softmax(const T* x, int64_t V, int64_t k, T c, TopK<T>& topk, std::vector<Cand<T>>& cand) {
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) return scan_softmax_avx2<kNucleus>(x, V, k, c, topk, cand);
#endif
  const Scan<T> r = scan_row(x, V, k, topk, cand);
  double Z = 0;
  if (!r.nan && !r.pinf && r.m > -std::numeric_limits<T>::infinity())
    Z = softmax_pass<false, false>(x, V, r.m, c, r.vk, r.m, false, (T*)nullptr, nullptr, nullptr).Z;
  return {r, Z};
}

// The top-k of a scan_softmax<true> pass: selected now when that pass left it to us.
template <class T>
T finish_deferred_top_k([[maybe_unused]] const T* x, [[maybe_unused]] int64_t V, [[maybe_unused]] int64_t k,
                        const ScanSum<T>& r, [[maybe_unused]] TopK<T>& topk, [[maybe_unused]] std::vector<Cand<T>>& cand) {
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>)
    if (topk.group) return select_via_group_max(x, V, k, topk.group, topk, cand);
#endif
  return r.vk;
}

}  // namespace fr::FR_ISA_NS::sampling
