// RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467) over the last dim, forward and backward:
//   y = x r w,  r = 1 / sqrt(mean(x^2) + eps)  per row;  math in fp32 (fp64 for fp64), y rounded once.
// Backward, with g = dy w:  dx = r g - x r^3 mean(g x),  dw = sum over rows of dy x r.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
struct RmsNormFwdParams {
  DType dtype;      // of x and y
  DType w_dtype;    // of w: x's dtype or f32 (a weight kept in fp32 under autocast)
  const void* x;    // (N, C)
  const void* w;    // (C,)
  void* y;          // (N, C) out
  void* rstd;       // (N,) out, acc_t: r of each row, for the backward
  int64_t N, C;
  double eps;
};

// dw is summed in fixed chunks of rows (each into its own row of `partial`), then over the chunks
// pairwise in a fixed tree: as accurate as torch's sum over rows, and the same bits for any thread count.
constexpr int64_t kRmsNormChunk = 16;
inline int64_t rms_norm_chunks(int64_t N) { return (N + kRmsNormChunk - 1) / kRmsNormChunk; }

struct RmsNormBwdParams {
  DType dtype;        // of dy, x and dx
  DType w_dtype;      // of w and dw
  const void* dy;     // (N, C)
  const void* x;      // (N, C)
  const void* w;      // (C,)
  const void* rstd;   // (N,) acc_t, from the forward
  void* dx;           // (N, C) out
  void* dw;           // (C,) out
  void* partial;      // (rms_norm_chunks(N), C) acc_t scratch
  int64_t N, C;
};

void rms_norm_fwd_cuda(const RmsNormFwdParams& p, cudaStream_t stream);
void rms_norm_bwd_cuda(const RmsNormBwdParams& p, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL_AVX512(rms_norm_fwd_cpu, RmsNormFwdParams)
FR_DECLARE_CPU_KERNEL_AVX512(rms_norm_bwd_cpu, RmsNormBwdParams)
