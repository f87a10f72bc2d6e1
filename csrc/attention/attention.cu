// Causal GQA attention forward on the GPU: one block per (16 query rows, head, batch), 4 warps of 4
// rows each. For each tile of 32 keys (K, V and their segment ids staged in shared memory), lane j
// scores key j against each of the warp's rows, the warp takes the tile max and sum (online softmax,
// scores in log2 units), and lanes then update the output columns they own (d = lane + 32 c).
// Key tiles past the block's last visible key are skipped. lse is written in natural log, fp64 as
// the CPU kernel's (the backward recomputes P from it).
#include "attention/attention_cuda.cuh"

namespace fr::cuda::attn {
namespace {

template <class T, int DC>
__global__ void __launch_bounds__(kThreads) fwd_kernel(AttnFwdParams p) {
  extern __shared__ float smem[];
  const int D = int(p.D), ld = D + 1;
  float* sQ = smem;                  // (kRows, D + 1)
  float* sK = sQ + kRows * ld;       // (kTile, D + 1)
  float* sV = sK + kTile * ld;       // (kTile, D + 1)
  __shared__ int64_t sSeg[kTile];

  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.H / p.Hkv), q0 = int64_t(blockIdx.x) * kRows;
  const int64_t offset = p.Tk - p.Tq;  // query i sits at position i + offset
  const T* q = static_cast<const T*>(p.q) + (b * p.H + h) * p.Tq * D;     // (Tq, D)
  const T* k = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.Tk * D;  // (Tk, D)
  const T* v = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * p.Tk * D;  // (Tk, D)
  const int64_t* seg = p.seg ? p.seg + b * p.Tk : nullptr;                // (Tk,)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  load_tile(sQ, q, q0, kRows, p.Tq, D, 1);
  const float qk_scale = float(p.scale) * kLog2e;  // scores in log2 units: exp2 instead of exp

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][DC];
  int64_t pos[kRowsPerWarp], seg_q[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    pos[r] = i < p.Tq ? i + offset : -1;  // -1: a padding row sees no key
    seg_q[r] = seg && i < p.Tq ? seg[i + offset] : 0;
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) o[r][c] = 0.f;
  }
  const int64_t k_end = min(p.Tk, q0 + kRows + offset);  // keys past the block's last row: masked

  for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
    __syncthreads();  // the previous tile is consumed
    load_tile(sK, k, k0, kTile, p.Tk, D, 1);
    load_tile(sV, v, k0, kTile, p.Tk, D, 1);
    if (seg && threadIdx.x < kTile) sSeg[threadIdx.x] = k0 + threadIdx.x < p.Tk ? seg[k0 + threadIdx.x] : 0;
    __syncthreads();

    const int64_t j = k0 + lane;
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.f;
    const float* kj = sK + lane * ld;
    for (int d = 0; d < D; ++d) {
      const float kd = kj[d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] += sQ[(warp * kRowsPerWarp + r) * ld + d] * kd;
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const bool ok = j < p.Tk && j <= pos[r] && (!seg || sSeg[lane] == seg_q[r]);
      const float sr = ok ? s[r] * qk_scale : -INFINITY;
      const float m_new = max(m[r], warp_max(sr));
      if (m_new == -INFINITY) {  // nothing visible yet in this row (uniform across the warp)
        s[r] = 0.f;
        continue;
      }
      const float alpha = exp2f(m[r] - m_new);  // 0 when m was -inf
      const float pr = ok ? exp2f(sr - m_new) : 0.f;
      l[r] = l[r] * alpha + warp_sum(pr);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < DC; ++c) o[r][c] *= alpha;
      s[r] = pr;
    }
    // o += P V: lane owns columns lane + 32 c; P[r][jj] comes from lane jj.
    for (int jj = 0; jj < kTile; ++jj) {
      float pj[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) pj[r] = __shfl_sync(0xffffffffu, s[r], jj);
      const float* vj = sV + jj * ld;
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const int d = lane + 32 * c;
        const float vd = d < D ? vj[d] : 0.f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) o[r][c] += pj[r] * vd;
      }
    }
  }

  T* out = static_cast<T*>(p.out) + (b * p.H + h) * p.Tq * D;  // (Tq, D)
  double* lse = p.lse + (b * p.H + h) * p.Tq;                    // (Tq,)
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.Tq) continue;
    const float inv_l = 1.f / l[r];  // l >= 1: every query sees its own key
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) store(out + i * D + d, o[r][c] * inv_l);
    }
    if (lane == 0) lse[i] = double((m[r] + log2f(l[r])) * kLn2);
  }
}

}  // namespace
}  // namespace fr::cuda::attn

namespace fr {

void attention_fwd_cuda(const AttnFwdParams& p, cudaStream_t stream) {
  using namespace cuda::attn;
  if (p.Tq < kAttnDecodeTq) return attention_decode_cuda(p, stream);  // attention_decode.cu
  if (p.B == 0 || p.H == 0 || p.Tq == 0) return;
  if (fwd_mma(p, stream)) return;  // bf16/fp16, D 64 or 128, Tq >= 16: tensor cores
  const size_t smem = size_t(kRows + 2 * kTile) * size_t(p.D + 1) * sizeof(float);
  const dim3 grid(unsigned(cuda::ceil_div(p.Tq, kRows)), unsigned(p.H), unsigned(p.B));
  FR_DISPATCH_HALF_FLOAT(p.dtype, FR_ATTN_DISPATCH_DC(p.D, {
    auto* kernel = &fwd_kernel<scalar_t, DC>;
    set_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kThreads, smem, stream>>>(p);
  }));
  cuda::check_launch("causal_attention_fwd");
}

}  // namespace fr
