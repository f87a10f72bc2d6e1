// Micro-kernels for the attention tiles: a register-blocked GEMM and the row operations of the
// online softmax (2^x, loads and reductions come from common/simd.h). Included only from csrc/attention/*.cpp, so it is compiled
// once per ISA like them. Operands are fp32 (fp64 for float64 inputs) tiles; the AVX2 build
// overloads the float versions with intrinsics, everything else is plain loops that auto-vectorise.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/dtype.h"
#include "common/simd.h"

namespace fr::FR_ISA_NS::attn {

using simd::exp2;
#if defined(FR_HAVE_AVX2)
using simd::hmax;
using simd::hsum;
using simd::load8;
#endif

inline int64_t round8(int64_t x) { return (x + 7) / 8 * 8; }

// Which part of a GEMM a causal diagonal tile needs, given lim = (first query position) - (first
// key) + 1, so that query row r sees key columns c < r + lim:
//   cols: C = S-like (rows = queries, columns = keys): row m needs columns n < m + lim only; the
//         other entries of C are left unwritten (the caller masks them);
//   k_hi: C = P @ rows-of-keys (reduction over keys): row m needs k < m + lim (the rest of P is 0);
//   k_lo: C = P^T @ rows-of-queries (rows = keys): row m needs k > m - lim.
// The skipped products are exact zeros, so skipping changes no bit of the result.
enum class Tri { none, cols, k_hi, k_lo };

// ---- generic (any element type; the float64 path and the baseline build) ---------------------
// C (M, N) = [C +] A (M, K) @ B (K, N). A is read one element at a time at A[m * a_rs + k * a_ks]
// (so P^T is just a_rs = 1, a_ks = ld); B rows are contiguous with stride ldb; C rows stride ldc.
// This version computes every product (tri is only a hint).
template <class T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
                 int64_t ldb, T* C, int64_t ldc, bool accumulate, Tri = Tri::none, int64_t = 0) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;  // (N,)
    if (!accumulate) std::fill(c, c + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * a_rs + k * a_ks];
      const T* b = B + k * ldb;  // (N,)
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// C (M, N) = A (M, K) @ B^T with B rows (N, K) contiguous (ldb): scores straight from key rows,
// for the few query rows of a decode step, where transposing the keys would cost as much as using them.
template <class T>
inline void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      T s = 0;
      for (int64_t k = 0; k < K; ++k) s += A[m * lda + k] * B[n * ldb + k];
      C[m * ldc + n] = s;
    }
}

template <class T>
inline T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
// x = exp2(x - sub) in place; returns the sum.
template <class T>
inline T exp2_sub_sum(T* x, int64_t n, T sub) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = exp2(x[i] - sub));
  return s;
}
// x = exp2(x - hi - lo) in place (backward: recompute P from the saved log-sum-exp hi + lo).
template <class T>
inline void exp2_sub2(T* x, int64_t n, T hi, T lo) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp2(x[i] - hi - lo);
}
template <class T>
inline void scale_row(T* x, int64_t n, T a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
// p = p * (dp - delta): dS of softmax from dP (FlashAttention-2, arXiv 2307.08691, alg. 2).
template <class T>
inline void softmax_grad(T* p, const T* dp, int64_t n, T delta) {
  for (int64_t i = 0; i < n; ++i) p[i] *= dp[i] - delta;
}
template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
// dst (n,) = src * mul converted to the math type; src of any storage type.
template <class S, class T>
inline void load_row(const S* src, T* dst, int64_t n, T mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(to_acc(src[i])) * mul;
}
template <class T, class S>
inline void store_row(const T* src, S* dst, int64_t n, T mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_acc<S>(src[i] * mul);
}

#if defined(FR_HAVE_AVX2)
// ---- AVX2 + FMA fp32 -------------------------------------------------------------------------
// Register block: R rows x 8*NV columns of C in 2*R <= 12 ymm accumulators, B row loaded once per k
// and reused by R broadcasts of A.
template <int R, int NV>
inline void gemm_block(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate) {
  // Full unrolling (the pragmas) lets the compiler keep the accumulator array in registers.
  __m256 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
    const float* a = A + k * a_ks;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * a_rs);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(ar, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

// As the generic gemm, but N must be a multiple of 8 (callers pad tiles; padded columns of C are
// garbage-free only if B's padding is zero, and are never stored to outputs), and the blocks a
// causal diagonal tile does not need (tri, lim) are skipped.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate, Tri tri = Tri::none, int64_t lim = 0) {
  using Fn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, bool);
  static constexpr Fn table[2][6] = {{gemm_block<1, 1>, gemm_block<2, 1>, gemm_block<3, 1>, gemm_block<4, 1>,
                                      gemm_block<5, 1>, gemm_block<6, 1>},
                                     {gemm_block<1, 2>, gemm_block<2, 2>, gemm_block<3, 2>, gemm_block<4, 2>,
                                      gemm_block<5, 2>, gemm_block<6, 2>}};
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      const int r = int(std::min<int64_t>(6, M - m0));
      int64_t n_end = N, k0 = 0, k1 = K;
      if (tri == Tri::cols) n_end = std::min(N, round8(m0 + r - 1 + lim));
      if (tri == Tri::k_hi) k1 = std::clamp<int64_t>(m0 + r - 1 + lim, 0, K);
      if (tri == Tri::k_lo) k0 = std::clamp<int64_t>(m0 - lim + 1, 0, K);
      if (n0 >= n_end) continue;
      const int nv = n_end - n0 >= 16 ? 2 : 1;
      table[nv - 1][r - 1](std::max<int64_t>(k1 - k0, 0), A + m0 * a_rs + k0 * a_ks, a_rs, a_ks,
                           B + k0 * ldb + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

// gemm_nt, AVX2: four keys at a time, each an 8-wide dot product over K, reduced together.
inline void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;  // (K,)
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
      const float* b = B + n * ldb;  // (4, K)
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 av = _mm256_loadu_ps(a + k);
        s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + k), s0);
        s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + ldb + k), s1);
        s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + 2 * ldb + k), s2);
        s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + 3 * ldb + k), s3);
      }
      // (s0 s1 s2 s3) -> their four horizontal sums in one vector
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      for (int64_t k = K8; k < K; ++k)
        r = _mm_add_ps(
            r, _mm_mul_ps(_mm_set1_ps(a[k]), _mm_setr_ps(b[k], b[ldb + k], b[2 * ldb + k], b[3 * ldb + k])));
      _mm_storeu_ps(C + m * ldc + n, r);
    }
    for (; n < N; ++n) {
      __m256 s0 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(B + n * ldb + k), s0);
      float t = hsum(s0);
      for (int64_t k = K8; k < K; ++k) t += a[k] * B[n * ldb + k];
      C[m * ldc + n] = t;
    }
  }
}

// Row operations over n = a multiple of 8 floats.
inline float row_max(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  return hmax(m);
}
inline float exp2_sub_sum(float* x, int64_t n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 p = exp2(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(x + i, p);
    acc = _mm256_add_ps(acc, p);
  }
  return hsum(acc);
}
inline void exp2_sub2(float* x, int64_t n, float hi, float lo) {
  const __m256 h = _mm256_set1_ps(hi), l = _mm256_set1_ps(lo);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(x + i, exp2(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), h), l)));
}
inline void scale_row(float* x, int64_t n, float a) {
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), av));
}
inline void softmax_grad(float* p, const float* dp, int64_t n, float delta) {
  const __m256 dv = _mm256_set1_ps(delta);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(p + i,
                     _mm256_mul_ps(_mm256_loadu_ps(p + i), _mm256_sub_ps(_mm256_loadu_ps(dp + i), dv)));
}

// In-register 8x8 transpose: r[i][j] <- r[j][i].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1 | a5 ...
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

template <class S>
inline void load_row(const S* src, float* dst, int64_t n, float mul) {
  const __m256 mv = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(load8(src + i), mv));
  for (; i < n; ++i) dst[i] = to_acc(src[i]) * mul;
}
#endif  // FR_HAVE_AVX2

}  // namespace fr::FR_ISA_NS::attn
