// Per-token log-probabilities and entropies of softmax(logits / T), forward and backward,
// streaming each row of V logits once without an (N, V) temporary.
#pragma once
#include <cstddef>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/dtype.h"
#include "common/runtime.h"

namespace fr {
// Row n of the logits is V contiguous elements at logits + row_offset[n] (leading dims may be
// strided, e.g. logits[:, :-1]). Statistics are in acc_t of the dtype (double for f64, else float).
struct TokenLogprobsFwdParams {
  DType dtype;                // of logits, logprobs, entropy
  const void* logits;         // rows of (V,)
  const int64_t* row_offset;  // (N,) element offset of each row
  const int64_t* targets;     // (N,)
  void* logprobs;             // (N,) out: log p[target]
  void* entropy;              // (N,) out, or nullptr when not requested
  void* lse;                  // (N,) out, acc_t: logsumexp(logits / T)
  void* mean_scaled;          // (N,) out, acc_t: E_p[logits / T]; nullptr when no entropy
  int64_t N, V;
  double inv_temperature;
  int64_t* bad_row;  // out: the first row whose target is outside [0, V), else -1
};

struct TokenLogprobsBwdParams {
  DType dtype;                    // of logits, grads, d_logits
  const void* logits;             // rows of (V,) as in the forward
  const int64_t* row_offset;      // (N,)
  const int64_t* targets;         // (N,) already validated by the forward
  const void* lse;                // (N,) acc_t, from the forward
  const void* mean_scaled;        // (N,) acc_t, or nullptr when grad_entropy is nullptr
  const void* grad_logprobs;      // (N,) or nullptr (= 0)
  const void* grad_entropy;       // (N,) or nullptr (= 0)
  void* d_logits;                 // (N, V) out, contiguous
  int64_t N, V;
  double inv_temperature;
};

// In place, for a loss sum_n scale * log p_n[target_n] over contiguous rows: each row of logits
// becomes its gradient scale * (onehot(target) - softmax(row)), and logprobs gets log p[target].
// The fused LM-head loss runs this on a chunk of rows between its GEMMs (no (N, V) temporary).
struct TokenLogprobsGradParams {
  DType dtype;             // of logits and logprobs
  void* logits;            // (N, V) in: logits, out: d(scale * logprob) / d logits
  const int64_t* targets;  // (N,) in [0, V), validated by the caller
  void* logprobs;          // (N,) out
  int64_t N, V;
  double scale;
};

// The CUDA launchers. Rows of logits (..., V) with stride 1 in V and at most two leading dims after
// merging: row n starts at (n / inner) * stride_outer + (n % inner) * stride_inner (logits[:, :-1] stays
// a view).
struct RowLayout {
  int64_t inner, stride_outer, stride_inner;
};
// p.row_offset and p.bad_row are unused (layout gives the rows); bad_row_dev is a (1,) int64 device
// scratch. Returns the first row whose target is outside [0, V), or -1, and then that target in
// *bad_target (host). This syncs the stream.
int64_t token_logprobs_fwd_cuda(const TokenLogprobsFwdParams& p, const RowLayout& layout, int64_t* bad_row_dev,
                                int64_t* bad_target, cudaStream_t stream);
void token_logprobs_bwd_cuda(const TokenLogprobsBwdParams& p, const RowLayout& layout, cudaStream_t stream);

// Asks Linux to back a fresh, large output buffer with 2 MiB pages before the kernel first
// writes it: faulting in (2048, 50304) fp32 with 4 KiB pages costs more than computing it.
// Only whole 2 MiB blocks inside [p, p + bytes) are affected; a no-op elsewhere.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}
}  // namespace fr

FR_DECLARE_CPU_KERNEL(token_logprobs_fwd_cpu, TokenLogprobsFwdParams)
FR_DECLARE_CPU_KERNEL(token_logprobs_bwd_cpu, TokenLogprobsBwdParams)
FR_DECLARE_CPU_KERNEL(token_logprobs_grad_cpu, TokenLogprobsGradParams)
