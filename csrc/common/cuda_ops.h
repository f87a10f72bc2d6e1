// The CUDA launchers (csrc/<op>/<op>.cu), declared for the torch glue without any CUDA header.
// Every pointer in a params struct is device memory unless its comment says host; each launcher
// enqueues its kernels on `stream` and throws std::runtime_error naming the kernel if a launch fails.
// The params structs are the CPU kernels' (same fields, same shapes), plus the few extras below.
#pragma once
#include <cstdint>

#include "attention/attention.h"
#include "gae/gae.h"
#include "logprobs/logprobs.h"
#include "ppo_loss/ppo_loss.h"
#include "sample/sample.h"

typedef struct CUstream_st* cudaStream_t;  // as in CUDA's driver_types.h

namespace fr {

// Rows of logits (..., V) with stride 1 in V and at most two leading dims after merging: row n
// starts at (n / inner) * stride_outer + (n % inner) * stride_inner (logits[:, :-1] stays a view).
struct RowLayout {
  int64_t inner, stride_outer, stride_inner;
};

void gae_cuda(const GaeParams& p, cudaStream_t stream);

void ppo_loss_cuda(const PpoLossParams& p, cudaStream_t stream);
// p.grad_loss is unused: grad_loss (one value of p.dtype) is read on the device, so the backward
// needs no host sync.
void ppo_loss_scale_cuda(const PpoLossScaleParams& p, const void* grad_loss, cudaStream_t stream);

// p.row_offset and p.bad_row are unused (layout gives the rows); bad_row_dev is a (1,) int64 device
// scratch. Returns the first row whose target is outside [0, V), or -1, and then that target in
// *bad_target (host). This syncs the stream.
int64_t token_logprobs_fwd_cuda(const TokenLogprobsFwdParams& p, const RowLayout& layout, int64_t* bad_row_dev,
                                int64_t* bad_target, cudaStream_t stream);
void token_logprobs_bwd_cuda(const TokenLogprobsBwdParams& p, const RowLayout& layout, cudaStream_t stream);

// p.status is a (B,) device buffer; status_host (B,) receives it (this syncs the stream). The CUDA
// kernel also checks the per-row parameters, which live on the device, with the codes below.
enum CudaRowStatus : uint8_t { kRowBadTemperature = 16, kRowBadTopK, kRowBadTopP, kRowBadMinP };
void sample_cuda(const SampleParams& p, uint8_t* status_host, cudaStream_t stream);

// fp32/bf16/fp16 (no float64 on CUDA); 1 <= D <= 256. Below Tq = kAttnDecodeTq the forward is the split-KV
// decode kernel (attention_decode.cu), which reads k, v through p.kv_plane (a KV-cache view in place) and
// needs p.work: attention_fwd_cuda_workspace(p) floats of device memory (0 otherwise). The other
// attention kernels read contiguous k, v.
constexpr int64_t kAttnDecodeTq = 16;
int64_t attention_fwd_cuda_workspace(const AttnFwdParams& p);
void attention_fwd_cuda(const AttnFwdParams& p, cudaStream_t stream);
void attention_decode_cuda(const AttnFwdParams& p, cudaStream_t stream);
void attention_bwd_cuda(const AttnBwdParams& p, cudaStream_t stream);

}  // namespace fr
