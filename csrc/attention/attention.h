// Causal (optionally segment-masked) grouped-query attention, flash-attention style on the CPU:
// tiles of queries x keys, online softmax, memory linear in T. Query i sits at position
// p = i + Tk - Tq and sees key j iff j <= p and (with segment ids) seg[j] == seg[p].
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
struct AttnFwdParams {
  DType dtype;         // of q, k, v, out
  const void* q;       // (B, H, Tq, D)
  const void* k;       // (B, Hkv, Tk, D)
  const void* v;       // (B, Hkv, Tk, D)
  const int64_t* seg;  // (B, Tk) segment ids, or nullptr
  void* out;           // (B, H, Tq, D) out
  double* lse;         // (B, H, Tq) out: natural-log sum of exp of the scaled scores (fp64: see .cpp)
  int64_t B, H, Hkv, Tq, Tk, D;
  double scale;
  int64_t kv_plane;    // elements between consecutive (b, h) planes of k and v: Tk * D when contiguous,
                       // more for a view of the first Tk positions of a preallocated KV cache
  float* work = nullptr;  // CUDA only: attention_fwd_cuda_workspace(*this) floats of scratch (below)
};

struct AttnBwdParams {
  DType dtype;         // of every tensor except seg and lse
  const void* dout;    // (B, H, Tq, D)
  const void* q;       // (B, H, Tq, D)
  const void* k;       // (B, Hkv, Tk, D)
  const void* v;       // (B, Hkv, Tk, D)
  const void* out;     // (B, H, Tq, D) the forward's output
  const double* lse;   // (B, H, Tq) the forward's lse
  const int64_t* seg;  // (B, Tk) or nullptr
  void* dq;            // (B, H, Tq, D) out
  void* dk;            // (B, Hkv, Tk, D) out
  void* dv;            // (B, Hkv, Tk, D) out
  int64_t B, H, Hkv, Tq, Tk, D;
  double scale;
};

// The CUDA launchers: fp32/bf16/fp16 (no float64 on CUDA); 1 <= D <= 256. Below Tq = kAttnDecodeTq the
// forward is the split-KV decode kernel (attention_decode.cu), which reads k, v through p.kv_plane (a
// KV-cache view in place) and needs p.work: attention_fwd_cuda_workspace(p) floats of device memory (0
// otherwise). The other attention kernels read contiguous k, v.
constexpr int64_t kAttnDecodeTq = 16;
int64_t attention_fwd_cuda_workspace(const AttnFwdParams& p);
void attention_fwd_cuda(const AttnFwdParams& p, cudaStream_t stream);
void attention_decode_cuda(const AttnFwdParams& p, cudaStream_t stream);
void attention_bwd_cuda(const AttnBwdParams& p, cudaStream_t stream);
}  // namespace fr

FR_DECLARE_CPU_KERNEL(attention_fwd_cpu, AttnFwdParams)
FR_DECLARE_CPU_KERNEL(attention_bwd_cpu, AttnBwdParams)
