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
// strided, e.g. logits[:, :-1]). The statistics saved for the backward are float64 and relative to the
// row's max logit M, so that nothing is lost at any magnitude: with d = (x - M) / T, lse = M / T + log S,
// S = sum e^d, and E_p[y] = M / T + E_p[d]. (A float lse is off by up to its ulp, 64 at logits ~1e9, and
// the backward's p = exp(y - lse) was then e^64; at ~1e30 even a double M / T + log S drops log S.)
struct TokenLogprobsFwdParams {
  DType dtype;                // of logits, logprobs, entropy
  const void* logits;         // rows of (V,)
  const int64_t* row_offset;  // (N,) element offset of each row
  const int64_t* targets;     // (N,)
  void* logprobs;             // (N,) out: log p[target]
  void* entropy;              // (N,) out, or nullptr when not requested
  double* lse;                // (N, 2) out: M and log S
  double* mean_scaled;        // (N,) out: E_p[d]; nullptr when no entropy
  int64_t N, V;
  double inv_temperature;
  int64_t* bad_row;  // out: the first row whose target is outside [0, V), else -1
};

struct TokenLogprobsBwdParams {
  DType dtype;                    // of logits, grads, d_logits
  const void* logits;             // rows of (V,) as in the forward
  const int64_t* row_offset;      // (N,)
  const int64_t* targets;         // (N,) already validated by the forward
  const double* lse;              // (N, 2) from the forward: M and log S
  const double* mean_scaled;      // (N,) E_p[d], or nullptr when grad_entropy is nullptr
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
