// SwiGLU's gate (Shazeer 2020, arXiv 2002.05202), elementwise: y = silu(g) u, silu(g) = g sigmoid(g).
// Backward: dg = dy u silu'(g) with silu'(g) = s + g s (1 - s), s = sigmoid(g); du = dy silu(g).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
struct SwigluFwdParams {
  DType dtype;       // of gate, up and y
  const void* gate;  // (N,)
  const void* up;    // (N,)
  void* y;           // (N,) out
  int64_t N;
};

struct SwigluBwdParams {
  DType dtype;       // of every tensor
  const void* gate;  // (N,) the forward's inputs
  const void* up;    // (N,)
  const void* dy;    // (N,) dL/dy
  void* dgate;       // (N,) out
  void* dup;         // (N,) out
  int64_t N;
};

void swiglu_fwd_cuda(const SwigluFwdParams& p, cudaStream_t stream);
void swiglu_bwd_cuda(const SwigluBwdParams& p, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL_AVX512(swiglu_fwd_cpu, SwigluFwdParams)
FR_DECLARE_CPU_KERNEL_AVX512(swiglu_bwd_cpu, SwigluBwdParams)
