// The policy loss of the critic-free algorithms (GRPO arXiv 2402.03300, Dr. GRPO 2503.20783, DAPO
// 2503.14476, RLOO 2402.14740, REINFORCE++ 2501.03262) as one fused pass over the (B, T) tokens: the
// asymmetric clipped surrogate, an optional k3 KL to the reference and an entropy bonus, aggregated
// per token or per sequence; the loss, statistics and, when asked, d loss / d (logprobs, entropy) for a
// unit upstream gradient. The backward is ppo_loss's scale kernel (PpoLossScaleParams).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
// Indices of the statistics in PolicyLossParams::stats (the order of reference.POLICY_STATS).
enum PolicyStat : int {
  kPlPgLoss = 0, kPlKl, kPlClipfracLow, kPlClipfracHigh, kPlApproxKl, kPlRatioMean, kPlRatioMax, kPlEntropy,
  kNumPolicyStats
};

// How the per-token losses l become one number (reference.POLICY_AGGS, in order). m: the mask,
// c_b = sum_t m_bt, S = the number of rows with c_b > 0 (at least 1):
//   token_mean               sum m l / max(sum c_b, 1)                  (DAPO)
//   seq_mean_token_mean      sum_b (sum_t m l / max(c_b, 1)) / S       (GRPO)
//   seq_mean_token_sum_norm  sum_b (sum_t m l / max_len) / S           (Dr. GRPO)
enum class PolicyAgg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSumNorm = 2 };

struct PolicyLossInputs {
  DType dtype;                // of every float input
  const void* logprobs;       // (B, T), contiguous like all below
  const void* old_logprobs;   // (B, T)
  const void* advantages;     // (B, T), or (B,) when adv_per_seq
  const void* ref_logprobs;   // (B, T) or nullptr
  const void* entropy;        // (B, T) or nullptr
  const void* mask;           // (B, T) uint8 0/1 when mask_is_bool, else weights in dtype
  bool mask_is_bool, adv_per_seq;
  int64_t B, T;
  PolicyAgg agg;
  double eps_low, eps_high;  // clip(r, 1 - eps_low, 1 + eps_high)
  double beta;               // k3 KL coefficient (> 0 needs ref_logprobs)
  double max_len;            // seq_mean_token_sum_norm's constant divisor
  double ent_coef;
};

struct PolicyLossParams {
  PolicyLossInputs in;
  void* loss;   // () out, dtype
  void* stats;  // (kNumPolicyStats,) out, acc_t of dtype
  void* grads;  // (K, B, T) out, acc_t of dtype: rows d/d logprobs [, d/d entropy when in.entropy];
                // nullptr: no gradients wanted
};

void policy_loss_cuda(const PolicyLossParams& p, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL(policy_loss_cpu, PolicyLossParams)
