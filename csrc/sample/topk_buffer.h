// Streaming top-k selection for one row (included by sample.cpp only, inside its ISA namespace).
// Tokens ranked by (x descending, index ascending) have unique keys, so the k-th key's x is the k-th
// largest logit counting ties. A token enters the buffer only if x > t, the k-th best logit so far (a
// later token equal to t ranks below the k-th key); the buffer is cut back to the k best when it holds
// k + max(k, 64), so a row costs O(V) plus ~k ln(V / k) entries. Tokens equal to t left outside are counted.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dtype.h"

#if defined(FR_HAVE_AVX2)
#include <immintrin.h>
#endif

namespace fr::FR_ISA_NS::sampling {

template <class T> struct Cand { T x, e; int64_t i; };  // a candidate token: logit, e = p / p_max, index

template <class T> inline bool better(const Cand<T>& a, const Cand<T>& b) {
  return a.x > b.x || (a.x == b.x && a.i < b.i);
}

#if defined(FR_HAVE_AVX2)
// For each 8-bit lane mask, the indices of its set lanes packed 4 bits each, for a compress by permute.
struct CompressLut {
  uint32_t v[256];
  constexpr CompressLut() : v() {
    for (int m = 0; m < 256; ++m)
      for (int b = 0, n = 0; b < 8; ++b)
        if (m >> b & 1) v[m] |= uint32_t(b) << (4 * n++);
  }
};
inline constexpr CompressLut kCompressLut{};
#endif

template <class T> struct TopK {
  static constexpr int64_t kChunk = 64;
  int64_t k = 0;
  T t = -std::numeric_limits<T>::infinity();  // the k-th best logit so far
  int64_t tied = 0;                            // tokens with x == t outside the buffer
  size_t n = 0, cap = 0;
  std::vector<T> bx;          // (cap + kChunk,) logits of the buffered tokens
  std::vector<int32_t> bi;    // (cap + kChunk,) their indices
  std::vector<Cand<T>> work;  // compaction scratch (double rows)
  std::vector<uint64_t> keys;  // compaction scratch (float rows)
  std::vector<float> group_max;  // (V / group,) max of each group of tokens (fused.h)
  int group = 0;                  // tokens per group: 64 or 8

  void reset(int64_t k_) {
    k = k_;
    t = -std::numeric_limits<T>::infinity();
    tied = 0;
    n = 0;
    cap = size_t(k + std::max<int64_t>(k, 64));  // small k: compact often, so t stays tight
    reserve(cap);
  }

  void reserve(size_t n_max) {  // grows only, so a row never pays to re-fill the buffers
    if (bx.size() < n_max + kChunk) bx.resize(n_max + kChunk), bi.resize(n_max + kChunk);
  }

  void push(T v, int64_t i) {
    if (v > t) {
      bx[n] = v;
      bi[n++] = int32_t(i);
      if (n >= cap) compact();
    } else if (v == t) {
      ++tied;
    }
  }

  // The kChunk tokens x[i0 ...]; callers skip chunks with no x >= t.
  void push_chunk(const T* x, int64_t i0) {
#if defined(FR_HAVE_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      const __m256 vt = _mm256_set1_ps(t);
      const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nibble = _mm256_set1_epi32(15);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t j = i0; j < i0 + kChunk; j += 8) {
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int32_t(j)), lane);
        const __m256 v = _mm256_loadu_ps(x + j);
        const unsigned ge = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GE_OQ)));
        if (!ge) continue;  // most vectors of a chunk
        const unsigned gt = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GT_OQ)));
        tied += __builtin_popcount(ge & ~gt);
        // branch-free compress of the entering lanes to the end of the buffer
        const __m256i packed = _mm256_set1_epi32(int32_t(kCompressLut.v[gt]));
        const __m256i perm = _mm256_and_si256(_mm256_srlv_epi32(packed, shifts), nibble);
        _mm256_storeu_ps(bx.data() + n, _mm256_permutevar8x32_ps(v, perm));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bi.data() + n), _mm256_permutevar8x32_epi32(idx, perm));
        n += size_t(__builtin_popcount(gt));
      }
      if (n >= cap) compact();
      return;
    }
#endif
    for (int64_t j = i0; j < i0 + kChunk; ++j) push(x[j], j);
  }

  // Keeps the k best keys; t becomes the k-th best logit.
  void compact() {
    T t_new;
    size_t dropped_eq = 0;
    if constexpr (std::is_same_v<T, float>) {
      // float keys as integers: order-preserving logit bits, then the inverted index (smaller wins)
      keys.resize(n);
      for (size_t j = 0; j < n; ++j) keys[j] = (uint64_t(ordered(bx[j])) << 32) | (0xFFFFFFFFu - uint32_t(bi[j]));
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
      const uint32_t t_ord = uint32_t(keys[size_t(k - 1)] >> 32);
      t_new = unordered(t_ord);
      for (size_t j = size_t(k); j < n; ++j) dropped_eq += uint32_t(keys[j] >> 32) == t_ord;
      for (size_t j = 0; j < size_t(k); ++j)
        bx[j] = unordered(uint32_t(keys[j] >> 32)), bi[j] = int32_t(0xFFFFFFFFu - uint32_t(keys[j]));
    } else {
      work.resize(n);
      for (size_t j = 0; j < n; ++j) work[j] = {bx[j], T(0), bi[j]};
      std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), better<T>);
      t_new = work[size_t(k - 1)].x;
      for (size_t j = size_t(k); j < n; ++j) dropped_eq += work[j].x == t_new;
      for (size_t j = 0; j < size_t(k); ++j) bx[j] = work[j].x, bi[j] = int32_t(work[j].i);
    }
    if (t_new != t) tied = 0;  // tokens equal to the old t are now below t
    t = t_new;
    tied += int64_t(dropped_eq);
    n = size_t(k);
  }

  static uint32_t ordered(float v) {  // monotone: a < b <=> ordered(a) < ordered(b) (no NaN here)
    const uint32_t u = float_to_bits(v);
    return u >> 31 ? ~u : u | 0x80000000u;
  }
  static float unordered(uint32_t o) { return bits_to_float(o >> 31 ? o & 0x7FFFFFFFu : ~o); }

  // The candidates into `out`, in index order: the k best keys, or every finite token when fewer than k
  // are finite.
  // Returns vk, the k-th largest logit (-inf in the second case).
  T finish(std::vector<Cand<T>>& out) {
    T vk = -std::numeric_limits<T>::infinity();
    if (int64_t(n) >= k) {
      compact();
      vk = t;
    }
    out.resize(n);
    for (size_t j = 0; j < n; ++j) out[j] = {bx[j], T(0), bi[j]};
    std::sort(out.begin(), out.end(), [](const Cand<T>& a, const Cand<T>& b) { return a.i < b.i; });
    return vk;
  }
};

}  // namespace fr::FR_ISA_NS::sampling
