// GELU, tanh approximation (GPT-2's "gelu_new", Hendrycks & Gimpel 2016, arXiv 1606.08415):
// y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), elementwise over any flattened shape.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
struct GeluFwdParams {
  DType dtype;     // of x and y
  const void* x;   // (N,)
  void* y;         // (N,) out
  int64_t N;
};

struct GeluBwdParams {
  DType dtype;     // of x, dy and dx
  const void* x;   // (N,) the forward's input
  const void* dy;  // (N,) dL/dy
  void* dx;        // (N,) out: dL/dx
  int64_t N;
};
}  // namespace fr

FR_DECLARE_CPU_KERNEL(gelu_tanh_fwd_cpu, GeluFwdParams)
FR_DECLARE_CPU_KERNEL(gelu_tanh_bwd_cpu, GeluBwdParams)
