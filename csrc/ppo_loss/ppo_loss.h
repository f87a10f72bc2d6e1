// PPO's clipped surrogate + clipped value loss (arXiv 1707.06347) as one fused pass over the (B, T)
// tokens: loss, statistics and, when asked, d loss / d (logprobs, values, entropy) for a unit
// upstream gradient (the loss is a scalar, so autograd's backward only has to scale them).
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

struct PpoLossParams {
  PpoLossInputs in;
  void* loss;   // () out, dtype
  void* stats;  // (kNumPpoStats,) out, acc_t of dtype
  void* grads;  // (K, N) out, acc_t of dtype: rows d/d logprobs, d/d values [, d/d entropy when
                // in.entropy]; nullptr: no gradients wanted
};

// The backward: out = grads * grad_loss, rounded to out's dtype. A kernel of its own (not a torch
// mul) because it runs on the calling thread: torch splits >= 32k elements across threads, and
// waking them costs more than the work here (milliseconds on a busy machine).
struct PpoLossScaleParams {
  DType dtype;        // of out; grads are acc_t of it
  const void* grads;  // (n,) the unit-gradient rows of PpoLossParams::grads
  double grad_loss;
  void* out;          // (n,)
  int64_t n;
};

void ppo_loss_cuda(const PpoLossParams& p, cudaStream_t stream);
// p.grad_loss is unused: grad_loss (one value of p.dtype) is read on the device, so the backward
// needs no host sync.
void ppo_loss_scale_cuda(const PpoLossScaleParams& p, const void* grad_loss, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL(ppo_loss_cpu, PpoLossParams)
FR_DECLARE_CPU_KERNEL(ppo_loss_scale_cpu, PpoLossScaleParams)
