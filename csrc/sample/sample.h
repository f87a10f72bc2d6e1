// Token sampling with temperature, top-k, top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751) and
// min-p filters, one row per task. Per row the allowed set is {i : x_i >= tau} for one logit threshold
// tau (top-k and top-p both keep a prefix of the logits sorted descending), intersected with min-p's
// {i : p_i >= min_p * p_max}. The token is the first index i, in index order, whose inclusive running
// sum of allowed exp((x_i - max) / temperature) exceeds u * (their total), u = philox_uniform(seed, row, 0).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {

// Why a row could not be sampled; the adapter turns these into errors naming the row.
enum RowStatus : uint8_t { kRowOk = 0, kRowNaN = 1, kRowPosInf = 2, kRowAllNegInf = 3 };

struct SampleParams {
  DType dtype;                // of logits
  const void* logits;         // (B, V)
  const double* temperature;  // (B,) >= 0 and finite; 0 = greedy (first argmax, no filters)
  const int64_t* top_k;       // (B,) >= 0; 0 or >= V = off
  const double* top_p;        // (B,) in (0, 1]; 1 = off
  const double* min_p;        // (B,) in [0, 1]; 0 = off
  uint64_t seed;              // Philox key; stream `row`, draw 0 gives each row's uniform
  int64_t* tokens;            // (B,) out
  float* logprobs;            // (B,) out: log softmax(logits / T)[token], unfiltered (T = 1 when greedy)
  uint8_t* status;            // (B,) out: RowStatus; tokens/logprobs of a bad row are meaningless
  int64_t B, V;
};


// The CUDA launcher. p.status is a (B,) device buffer; status_host (B,) receives it (this syncs the
// stream). The CUDA kernel also checks the per-row parameters, which live on the device, with the codes below.
enum CudaRowStatus : uint8_t { kRowBadTemperature = 16, kRowBadTopK, kRowBadTopP, kRowBadMinP };
void sample_cuda(const SampleParams& p, uint8_t* status_host, cudaStream_t stream);

}  // namespace fr

FR_DECLARE_CPU_KERNEL(sample_cpu, SampleParams)
