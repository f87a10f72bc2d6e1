// PPO's clipped surrogate + clipped value loss (arXiv 1707.06347) as one fused forward pass
// (loss and statistics) and one fused backward pass over the (B, T) tokens.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
// Indices of the statistics in PpoLossFwdParams::stats (the order of reference.PPO_STATS).
enum PpoStat : int {
  kPgLoss = 0, kVLoss, kClipfrac, kVfClipfrac, kApproxKl, kRatioMean, kRatioMax, kEntropy, kNumPpoStats
};

struct PpoLossInputs {
  DType dtype;                // of every float input
  const void* logprobs;       // (N,) N = B * T, contiguous like all below
  const void* old_logprobs;   // (N,)
  const void* advantages;     // (N,)
  const void* values;         // (N,)
  const void* old_values;     // (N,)
  const void* returns;        // (N,)
  const void* entropy;        // (N,) or nullptr
  const void* mask;           // (N,) uint8 0/1 when mask_is_bool, else weights in dtype
  bool mask_is_bool;
  int64_t N;
  double clip_range, clip_range_value, vf_coef, ent_coef;
};

struct PpoLossFwdParams {
  PpoLossInputs in;
  void* loss;   // () out, dtype
  void* stats;  // (kNumPpoStats,) out, acc_t of dtype
};

struct PpoLossBwdParams {
  PpoLossInputs in;
  double grad_loss;
  void* d_logprobs;  // (N,) out, dtype
  void* d_values;    // (N,) out, dtype
  void* d_entropy;   // (N,) out, dtype; nullptr when in.entropy is
};
}  // namespace fr

FR_DECLARE_CPU_KERNEL(ppo_loss_fwd_cpu, PpoLossFwdParams)
FR_DECLARE_CPU_KERNEL(ppo_loss_bwd_cpu, PpoLossBwdParams)
