// Register tiles of RM weight rows x RN input rows: each weight row is loaded once per tile of
// inputs and the whole x (N x K floats, a few KiB) stays in L1/L2, so w streams from memory once.
// Dot products run along K (w's contiguous dim) and are reduced horizontally at the end.
#include "linear/linear.h"

#if defined(FR_HAVE_AVX2)
#include <immintrin.h>
#endif

namespace fr::FR_ISA_NS {

constexpr int kRM = 4;  // weight rows per tile
constexpr int kRN = 3;  // input rows per tile: 12 accumulators + 4 weight registers = 16 ymm

#if defined(FR_HAVE_AVX2)
static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// y[n0 + j, m0 + i] for i < RM, j < RN.
template <int RM, int RN>
static void tile(const RowsLinearParams& p, int64_t m0, int64_t n0) {
  const int64_t K = p.K;
  const float* w[RM];  // RM x (K,)
  const float* x[RN];  // RN x (K,)
  for (int i = 0; i < RM; ++i) w[i] = p.w + (m0 + i) * K;
  for (int j = 0; j < RN; ++j) x[j] = p.x + (n0 + j) * p.x_stride;
  float out[RM][RN] = {};
  int64_t k = 0;
#if defined(FR_HAVE_AVX2)
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  // The first pass over a weight tile also prefetches the next one (the next RM rows, contiguous), so
  // its DRAM latency hides behind this tile's FMAs; without it, a 16-row x ran at ~65% of peak.
  const float* next = n0 == 0 && m0 + 2 * RM <= p.M ? w[0] + RM * K : nullptr;
  for (; k + 8 <= K; k += 8) {
    if (next)
      for (int i = 0; i < RM; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    __m256 wv[RM];
    for (int i = 0; i < RM; ++i) wv[i] = _mm256_loadu_ps(w[i] + k);
    for (int j = 0; j < RN; ++j) {
      const __m256 xv = _mm256_loadu_ps(x[j] + k);
      for (int i = 0; i < RM; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  if constexpr (RM == 4) {
    if (K % 8 == 0) {  // the 4 sums of a column of acc are y[n, m0:m0+4]: reduce them together
      const __m128 b = p.bias ? _mm_loadu_ps(p.bias + m0) : _mm_setzero_ps();
      for (int j = 0; j < RN; ++j) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][j], acc[1][j]), _mm256_hadd_ps(acc[2][j], acc[3][j]));
        const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(p.y + (n0 + j) * p.M + m0, _mm_add_ps(sum, b));
      }
      return;
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) out[i][j] = hsum(acc[i][j]);
#endif
  for (; k < K; ++k)  // the K % 8 tail, or all of K in the baseline build
    for (int i = 0; i < RM; ++i)
      for (int j = 0; j < RN; ++j) out[i][j] += w[i][k] * x[j][k];
  for (int i = 0; i < RM; ++i) {
    const float b = p.bias ? p.bias[m0 + i] : 0.0f;
    for (int j = 0; j < RN; ++j) p.y[(n0 + j) * p.M + m0 + i] = out[i][j] + b;
  }
}

template <int RM>
static void weight_tile(const RowsLinearParams& p, int64_t m0) {
  int64_t n = 0;
  for (; n + kRN <= p.N; n += kRN) tile<RM, kRN>(p, m0, n);
  if (p.N - n == 2) tile<RM, 2>(p, m0, n);
  if (p.N - n == 1) tile<RM, 1>(p, m0, n);
}

void rows_linear_cpu(const RowsLinearParams& p) {
  const int64_t tiles = (p.M + kRM - 1) / kRM;
  // Chunks of >= 8M multiply-adds (~1 ms): a decode step's block linears (16 rows: ~4M) run on the
  // calling thread. Waking a pool thread that another process has descheduled costs a scheduler
  // time slice (~10 ms measured on a loaded 2-core box), far more than a small op gains from it.
  const int64_t per_tile = kRM * p.N * p.K;
  const int64_t grain = (int64_t(1) << 23) / (per_tile > 0 ? per_tile : 1) + 1;
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * kRM, rows = p.M - m0;
      if (rows >= 4) weight_tile<4>(p, m0);
      else if (rows == 3) weight_tile<3>(p, m0);
      else if (rows == 2) weight_tile<2>(p, m0);
      else weight_tile<1>(p, m0);
    }
  });
}

}  // namespace fr::FR_ISA_NS
