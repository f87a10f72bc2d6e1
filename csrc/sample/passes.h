// The O(V) passes over one row of the sampler (included by sample.cpp only, inside its ISA namespace).
// Each pass has an AVX2 path for float rows and a scalar path for tails, double rows and the
// baseline build; the two give bit-identical results (same operations, same exp polynomial).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/simd.h"
#include "sample/topk_buffer.h"

namespace fr::FR_ISA_NS::sampling {

// e = 2^d2 for d2 = (x - max) * log2(e) / T <= 0: the scalar and vector versions of simd::exp2 give
// bit-identical results, and d2 < -125 gives exactly 0.
using simd::exp2;
#if defined(FR_HAVE_AVX2)
using simd::hi_pd;
using simd::hsum;
using simd::lo_pd;
#endif

// floor(log2(max(z, 1))) from the exponent bits.
inline int floor_log2(double z) {
  if (!(z >= 2.0)) return 0;
  uint64_t u;
  std::memcpy(&u, &z, 8);
  return int((u >> 52) & 0x7ff) - 1023;
}

template <class T> constexpr bool kVec =
#if defined(FR_HAVE_AVX2)
    std::is_same_v<T, float>;
#else
    false;
#endif

// Top-p histogram: bucket b holds the tokens with d2 = log2(p / p_max) in (-(b+1)/16, -b/16], i.e.
// probabilities within 4.4% of each other; tokens left out are marked kBuckets + lane (spare slots).
constexpr int kBuckets = 2048;
constexpr float kBucketsPerOctave = 16.f;
constexpr int kSpare = 8;
constexpr int64_t kBlock = 64;  // chunks of tokens: the unit of the vector loops and of the block sums

// ---- pass 1: max, NaN / +inf flags and top-k candidates ------------------------------------------
// Which of NaN and +inf x[0, n) holds; the vector loops only flag that one of them is there.
template <class T> void bad_values(const T* x, int64_t n, bool& nan, bool& pinf) {
  for (int64_t i = 0; i < n; ++i) {
    nan |= x[i] != x[i];
    pinf |= x[i] == std::numeric_limits<T>::infinity();
  }
}

template <class T> struct Scan {
  T m;           // row max
  bool nan, pinf;
  T vk;          // k-th largest logit counting ties (-inf when fewer than k are finite)
  int64_t tied;  // tokens with x == vk missing from the candidates
};

// With k > 0, `cand` receives the top-k candidates (see topk_buffer.h). Chunks of 64 tokens are first
// tested as a whole (any x >= t?), so the hot loop has no call in it.
template <class T> Scan<T> scan_row(const T* x, int64_t V, int64_t k, TopK<T>& topk, std::vector<Cand<T>>& cand) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  topk.reset(k);
  T m = -inf;
  bool nan = false, pinf = false;
  int64_t i = 0;
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) {
    __m256 vmax = _mm256_set1_ps(-inf), vbad = _mm256_setzero_ps();
    const __m256 pinfv = _mm256_set1_ps(inf);
    for (; i + kBlock <= V; i += kBlock) {
      const __m256 vt = _mm256_set1_ps(topk.t);
      __m256 ge = _mm256_setzero_ps();
      for (int64_t j = i; j < i + kBlock; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        vmax = _mm256_max_ps(vmax, v);
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v, pinfv, _CMP_NLT_UQ));  // NaN or +inf
        ge = _mm256_or_ps(ge, _mm256_cmp_ps(v, vt, _CMP_GE_OQ));
      }
      if (k && _mm256_movemask_ps(ge)) topk.push_chunk(x, i);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    for (float l : lanes) m = l > m ? l : m;
    if (_mm256_movemask_ps(vbad)) bad_values(x, i, nan, pinf);
  }
#endif
  for (; i < V; ++i) {
    const T v = x[i];
    nan |= v != v;
    pinf |= v == inf;
    m = v > m ? v : m;
    if (k) topk.push(v, i);
  }
  const T vk = k ? topk.finish(cand) : -inf;
  return {m, nan, pinf, vk, topk.tied};
}

// ---- pass 2: e_i = 2^((x_i - m) * c), c = log2(e) / T: sums, optionally stored and histogrammed -------
struct Sums {
  double Z = 0;   // sum of e over the row (the unfiltered softmax's denominator)
  double Zk = 0;  // sum of e over top-k survivors x >= vk (kHist only; = Z without top-k)
};

// kStore: e written to `e` (V,). kHist: survivors (x >= vk) with d2 >= cut add their e to hist[bucket]
// and record the bucket in `bucket` (V,); the others are recorded as kBuckets + lane.
// Sums are accumulated in float over blocks of 64 tokens (error <= 8 ulp), then in double.
template <bool kStore, bool kHist, class T>
Sums softmax_pass(const T* x, int64_t V, T m, T c, T vk, T cut0, bool rise, T* e, uint16_t* bucket, double* hist) {
  Sums s;
  // The histogram's cut: with `rise`, cut0 + floor(log2(survivor mass so far)), which only rises and
  // stays <= cut0 + log2(Zk) (see the top-p note in sample.cpp); else cut0.
  auto cut_after = [cut0, rise](double zk) { return rise ? cut0 + T(floor_log2(zk)) : cut0; };
  T d_cut = cut0;
  int64_t i = 0;
  auto bucket_of = [](T d2) { return int32_t(std::min(d2 * T(-kBucketsPerOctave), T(kBuckets - 1))); };
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) {
    __m256d z0 = _mm256_setzero_pd(), z1 = z0, zk0 = z0, zk1 = z0;
    const __m256 vm = _mm256_set1_ps(m), vc = _mm256_set1_ps(c), vvk = _mm256_set1_ps(vk);
    __m256 vcut = _mm256_set1_ps(d_cut);
    const __m256 vneg = _mm256_set1_ps(-kBucketsPerOctave);
    const __m256 vtop = _mm256_set1_ps(float(kBuckets - 1));
    // tokens left out are marked kBuckets + lane
    const __m256i none = _mm256_add_epi32(_mm256_set1_epi32(kBuckets), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // One vector of 8 tokens; returns e, and e masked to survivors (kHist) through `ek`.
    auto step = [&](int64_t j, __m256& ek) {
      const __m256 v = _mm256_loadu_ps(x + j);
      const __m256 d2 = _mm256_mul_ps(_mm256_sub_ps(v, vm), vc);
      const __m256 ev = exp2(d2);
      if constexpr (kStore) _mm256_storeu_ps(e + j, ev);
      if constexpr (kHist) {
        const __m256 ge = _mm256_cmp_ps(v, vvk, _CMP_GE_OQ);
        ek = _mm256_and_ps(ev, ge);
        const __m256 sel = _mm256_and_ps(_mm256_cmp_ps(d2, vcut, _CMP_GE_OQ), ge);
        __m256i b = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_mul_ps(d2, vneg), vtop));
        b = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(none), _mm256_castsi256_ps(b), sel));
        const __m256i b16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);  // 8 x u16 in lane 0
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bucket + j), _mm256_castsi256_si128(b16));
      }
      return ev;
    };
    for (; i + kBlock <= V; i += kBlock) {
      __m256 a = _mm256_setzero_ps(), ak = a, ek = a;
      for (int64_t j = i; j < i + kBlock; j += 8) {
        a = _mm256_add_ps(a, step(j, ek));
        if constexpr (kHist) ak = _mm256_add_ps(ak, ek);
      }
      z0 = _mm256_add_pd(z0, lo_pd(a));
      z1 = _mm256_add_pd(z1, hi_pd(a));
      if constexpr (kHist) {
        zk0 = _mm256_add_pd(zk0, lo_pd(ak));
        zk1 = _mm256_add_pd(zk1, hi_pd(ak));
        if ((i & (16 * kBlock - 1)) == 0)  // now and then: a serial dependency between blocks costs
          vcut = _mm256_set1_ps(d_cut = cut_after(hsum(_mm256_add_pd(zk0, zk1))));
      }
    }
    for (; i + 8 <= V; i += 8) {
      __m256 ek = _mm256_setzero_ps();
      const __m256 ev = step(i, ek);
      z0 = _mm256_add_pd(z0, lo_pd(ev));
      z1 = _mm256_add_pd(z1, hi_pd(ev));
      if constexpr (kHist) zk0 = _mm256_add_pd(zk0, lo_pd(ek)), zk1 = _mm256_add_pd(zk1, hi_pd(ek));
    }
    // The scatter, as a plain loop over the stored buckets and e: faster than from inside the vector
    // loop. Tokens left out add to their lane's spare slot, which nobody reads.
    if constexpr (kHist)
      for (int64_t j = 0; j < i; ++j) hist[bucket[j]] += double(e[j]);
    s.Z = hsum(_mm256_add_pd(z0, z1));
    s.Zk = hsum(_mm256_add_pd(zk0, zk1));
  }
#endif
  for (; i < V; ++i) {
    const T d2 = (x[i] - m) * c;
    const T ev = exp2(d2);
    if constexpr (kStore) e[i] = ev;
    s.Z += double(ev);
    if constexpr (kHist) {
      const bool ge = x[i] >= vk;
      s.Zk += ge ? double(ev) : 0.0;
      if ((i & (kBlock - 1)) == 0) d_cut = cut_after(s.Zk);
      const bool sel = ge && d2 >= d_cut;
      bucket[i] = uint16_t(sel ? bucket_of(d2) : kBuckets);
      if (sel) hist[bucket_of(d2)] += double(ev);
    }
  }
  return s;
}

// ---- gathering tokens: those of one histogram bucket; those tied at a logit --------------------------
template <class T>
void collect_bucket(const T* x, const T* e, const uint16_t* bucket, int64_t V, int b, std::vector<Cand<T>>& out) {
  out.clear();
  int64_t i = 0;
#if defined(FR_HAVE_AVX2)
  const __m256i vb = _mm256_set1_epi16(int16_t(b));
  for (; i + 16 <= V; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + i));
    // two mask bits per 16-bit lane: keep the even ones
    for (unsigned bits = unsigned(_mm256_movemask_epi8(_mm256_cmpeq_epi16(v, vb))) & 0x55555555u; bits;
         bits &= bits - 1) {
      const int64_t j = i + __builtin_ctz(bits) / 2;
      out.push_back({x[j], e[j], j});
    }
  }
#endif
  for (; i < V; ++i)
    if (bucket[i] == b) out.push_back({x[i], e[i], i});
}

template <class T> void collect_equal(const T* x, int64_t V, T v, std::vector<Cand<T>>& out) {
  int64_t i = 0;
#if defined(FR_HAVE_AVX2)
  if constexpr (kVec<T>) {
    const __m256 vv = _mm256_set1_ps(v);
    for (; i + 8 <= V; i += 8)
      for (unsigned bits = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ)));
           bits; bits &= bits - 1)
        out.push_back({v, T(0), i + __builtin_ctz(bits)});
  }
#endif
  for (; i < V; ++i)
    if (x[i] == v) out.push_back({v, T(0), i});
}

}  // namespace fr::FR_ISA_NS::sampling
