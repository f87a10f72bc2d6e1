// y = x @ w^T + b for a few rows of x: the decode step's linears and LM head. GEMM libraries are
// tuned for many rows; with 1-64 rows the cost is streaming w once, which this kernel does.
#pragma once
#include <cstdint>

#include "common/runtime.h"

namespace fr {
struct RowsLinearParams {
  const float* x;     // (N, K), rows x_stride floats apart (a view such as h[:, -1] is read in place)
  const float* w;     // (M, K) row-major: nn.Linear's (out, in) layout
  const float* bias;  // (M,) or nullptr
  float* y;           // (N, M) out
  int64_t N, M, K, x_stride;
};
}  // namespace fr

FR_DECLARE_CPU_KERNEL(rows_linear_cpu, RowsLinearParams)
