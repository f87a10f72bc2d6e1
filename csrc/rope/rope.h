// Rotary position embeddings (RoFormer, Su et al. 2021, arXiv 2104.09864) on q and k together, in HF's
// half-split layout: in each head the pairs (x[i], x[i + D/2]) rotate by a_i = float(pos) * inv_freq[i]
// (an fp32 product, as HF computes it):
//   y[i] = x[i] cos a_i - x[i + D/2] sin a_i,   y[i + D/2] = x[i + D/2] cos a_i + x[i] sin a_i.
// cos a_i and sin a_i are the fp32 roundings of the exact values (computed in fp64), once per token for
// every head of q and k. The backward is the rotation by -a_i. Each tensor has its own strides for its
// B, T and H dims, so one pass also moves (B, T, H, D) to (B, H, T, D) (the forward) and back.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
constexpr int64_t kRopeMaxD = 512;

struct RopeTensor {
  const void* x;             // (B, T, H, D) at the strides below, each row of D contiguous
  void* y;                   // (B, T, H, D) out, at its strides
  int64_t H;                 // heads (may be 0)
  int64_t xs_b, xs_t, xs_h;  // element strides of x's B, T and H dims
  int64_t ys_b, ys_t, ys_h;  // and of y's
};

struct RopeParams {
  DType dtype;               // of q and k, in and out
  RopeTensor q, k;
  const int64_t* positions;  // (B, T): positions[b * pos_sb + t]; pos_sb = 0 for one (T,) row for all b
  int64_t pos_sb;
  const float* inv_freq;     // (D / 2,) fp32
  int64_t B, T, D;           // D even, <= kRopeMaxD
  bool inverse;              // rotate by -a: the backward
};

void rope_cuda(const RopeParams& p, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL_AVX512(rope_cpu, RopeParams)
