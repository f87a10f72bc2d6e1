// Generalized Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
struct GaeParams {
  DType dtype;            // of rewards, values, advantages, returns
  const void* rewards;    // (B, T)
  const void* values;     // (B, T)
  const uint8_t* mask;    // (B, T) 1 = response token
  void* advantages;       // (B, T) out
  void* returns;          // (B, T) out
  int64_t B, T;
  double gamma, lam;
};

void gae_cuda(const GaeParams& p, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL(gae_cpu, GaeParams)
