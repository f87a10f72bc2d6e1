// Shared by the CUDA attention kernels (attention.cu, attention_bwd.cu): tile sizes, tile loads into
// shared memory (fp32, rows padded by one word so that a warp reading 32 rows at one column hits 32
// banks), and the mask rule. A straightforward tiled flash-attention (fp32 FMAs, no tensor cores):
// written to be right on first run, not yet fast.
// Query i sits at p = i + Tk - Tq and sees key j iff j <= p and (with segment ids) seg[j] == seg[p].
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention.h"
#include "common/cuda_utils.cuh"

namespace fr::cuda::attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;                // query rows (forward, dQ) or keys (dK/dV) per warp
constexpr int kRows = kWarps * kRowsPerWarp;   // 16 rows per block
constexpr int kTile = 32;                      // the other side of a tile: one per lane
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Loads rows [r0, r0 + n) of a (R, D) matrix into dst (n, D + pad) as fp32; rows >= R are zero.
template <class T>
__device__ __forceinline__ void load_tile(float* dst, const T* __restrict__ src, int64_t r0, int n, int64_t R,
                                          int D, int pad) {
  const int ld = D + pad;
  for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
    const int r = idx / D, d = idx - r * D;
    dst[r * ld + d] = r0 + r < R ? float(load(src + (r0 + r) * D + d)) : 0.f;
  }
}

// Columns per lane in 32-column chunks (D <= 64, 128, 256), a compile-time bound of the register arrays.
inline int chunks_for(int64_t D) { return D <= 64 ? 2 : D <= 128 ? 4 : 8; }

inline void set_smem(const void* kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "attention: raise the shared-memory limit");
}

// Dispatches DC over {2, 4, 8} (D <= 64, 128, 256).
#define FR_ATTN_DISPATCH_DC(D, ...)                     \
  switch (::fr::cuda::attn::chunks_for(D)) {            \
    case 2: { constexpr int DC = 2; __VA_ARGS__; break; } \
    case 4: { constexpr int DC = 4; __VA_ARGS__; break; } \
    default: { constexpr int DC = 8; __VA_ARGS__; break; } \
  }

// The tensor-core forward (attention_mma.cu) for bf16/fp16, D in {64, 128}, Tq >= 16 with 16-byte aligned
// rows; returns false (and launches nothing) for any other input.
bool fwd_mma(const AttnFwdParams& p, cudaStream_t stream);

}  // namespace fr::cuda::attn
