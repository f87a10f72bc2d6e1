// Causal GQA attention backward on the GPU, two kernels and no atomics (deterministic):
// - dq_kernel: one block per (16 query rows, head, batch), as the forward: for each key tile it
//   recomputes P = 2^(s - lse) and dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ += dS K.
// - dkv_kernel: one block per (16 keys, kv head, batch), 4 warps of 4 keys: for every query head of
//   the group and every 32-query tile that can see the keys (lane = query), dV += P^T dO and
//   dK += dS^T Q, accumulated in registers by the lanes' columns (d = lane + 32 c).
// Both recompute the scores; the forward's lse (natural log, fp64) gives P without a row max.
#include "attention/attention_cuda.cuh"

namespace fr::cuda::attn {
namespace {

// rowsum(dO * O) of `rows` rows starting at i0, one warp per row, into dst (rows,).
template <class T>
__device__ void rowdot(float* dst, const T* __restrict__ dout, const T* __restrict__ out, int64_t i0, int rows,
                       int64_t Tq, int D) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < rows; r += kWarps) {
    float acc = 0.f;
    if (i0 + r < Tq)
      for (int d = lane; d < D; d += 32) acc += float(load(dout + (i0 + r) * D + d)) * float(load(out + (i0 + r) * D + d));
    acc = warp_sum(acc);
    if (lane == 0) dst[r] = acc;
  }
}

template <class T, int DC>
__global__ void __launch_bounds__(kThreads) dq_kernel(AttnBwdParams p) {
  extern __shared__ float smem[];
  const int D = int(p.D), ld = D + 1;
  float* sQ = smem;               // (kRows, D + 1)
  float* sdO = sQ + kRows * ld;   // (kRows, D + 1)
  float* sK = sdO + kRows * ld;   // (kTile, D + 1)
  float* sV = sK + kTile * ld;    // (kTile, D + 1)
  __shared__ int64_t sSeg[kTile];
  __shared__ float sDelta[kRows];

  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.H / p.Hkv), q0 = int64_t(blockIdx.x) * kRows;
  const int64_t offset = p.Tk - p.Tq, qoff = (b * p.H + h) * p.Tq;
  const T* q = static_cast<const T*>(p.q) + qoff * D;          // (Tq, D)
  const T* dout = static_cast<const T*>(p.dout) + qoff * D;    // (Tq, D)
  const T* out = static_cast<const T*>(p.out) + qoff * D;      // (Tq, D)
  const T* k = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.Tk * D;  // (Tk, D)
  const T* v = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * p.Tk * D;  // (Tk, D)
  const int64_t* seg = p.seg ? p.seg + b * p.Tk : nullptr;                // (Tk,)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  load_tile(sQ, q, q0, kRows, p.Tq, D, 1);
  load_tile(sdO, dout, q0, kRows, p.Tq, D, 1);
  rowdot(sDelta, dout, out, q0, kRows, p.Tq, D);
  const float qk_scale = float(p.scale) * kLog2e;

  float dq[kRowsPerWarp][DC], lse2[kRowsPerWarp];
  int64_t pos[kRowsPerWarp], seg_q[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    pos[r] = i < p.Tq ? i + offset : -1;
    seg_q[r] = seg && i < p.Tq ? seg[i + offset] : 0;
    lse2[r] = i < p.Tq ? float(p.lse[qoff + i]) * kLog2e : 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) dq[r][c] = 0.f;
  }
  const int64_t k_end = min(p.Tk, q0 + kRows + offset);

  for (int64_t k0 = 0; k0 < k_end; k0 += kTile) {
    __syncthreads();
    load_tile(sK, k, k0, kTile, p.Tk, D, 1);
    load_tile(sV, v, k0, kTile, p.Tk, D, 1);
    if (seg && threadIdx.x < kTile) sSeg[threadIdx.x] = k0 + threadIdx.x < p.Tk ? seg[k0 + threadIdx.x] : 0;
    __syncthreads();

    const int64_t j = k0 + lane;
    float s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = 0.f;
    const float *kj = sK + lane * ld, *vj = sV + lane * ld;
    for (int d = 0; d < D; ++d) {
      const float kd = kj[d], vd = vj[d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r] += sQ[(warp * kRowsPerWarp + r) * ld + d] * kd;
        dp[r] += sdO[(warp * kRowsPerWarp + r) * ld + d] * vd;
      }
    }
    float ds[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const bool ok = j < p.Tk && j <= pos[r] && (!seg || sSeg[lane] == seg_q[r]);
      const float pr = ok ? exp2f(s[r] * qk_scale - lse2[r]) : 0.f;
      ds[r] = pr * (dp[r] - sDelta[warp * kRowsPerWarp + r]);
    }
    for (int jj = 0; jj < kTile; ++jj) {
      float dsj[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) dsj[r] = __shfl_sync(0xffffffffu, ds[r], jj);
      const float* kr = sK + jj * ld;
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const int d = lane + 32 * c;
        const float kd = d < D ? kr[d] : 0.f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) dq[r][c] += dsj[r] * kd;
      }
    }
  }

  T* dqp = static_cast<T*>(p.dq) + qoff * D;  // (Tq, D)
  const float scale = float(p.scale);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.Tq) continue;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) store(dqp + i * D + d, dq[r][c] * scale);
    }
  }
}

template <class T, int DC>
__global__ void __launch_bounds__(kThreads) dkv_kernel(AttnBwdParams p) {
  extern __shared__ float smem[];
  const int D = int(p.D), ld = D + 1;
  float* sK = smem;                // (kRows, D + 1) this block's keys
  float* sV = sK + kRows * ld;     // (kRows, D + 1)
  float* sQ = sV + kRows * ld;     // (kTile, D + 1) a tile of queries
  float* sdO = sQ + kTile * ld;    // (kTile, D + 1)
  __shared__ float sDelta[kTile], sLse2[kTile];
  __shared__ int64_t sSegQ[kTile];

  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = int64_t(blockIdx.x) * kRows, G = p.H / p.Hkv;
  const int64_t offset = p.Tk - p.Tq, koff = (b * p.Hkv + hk) * p.Tk;
  const T* k = static_cast<const T*>(p.k) + koff * D;  // (Tk, D)
  const T* v = static_cast<const T*>(p.v) + koff * D;  // (Tk, D)
  const int64_t* seg = p.seg ? p.seg + b * p.Tk : nullptr;  // (Tk,)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float qk_scale = float(p.scale) * kLog2e;

  load_tile(sK, k, j0, kRows, p.Tk, D, 1);
  load_tile(sV, v, j0, kRows, p.Tk, D, 1);
  float dk[kRowsPerWarp][DC], dv[kRowsPerWarp][DC];
  int64_t jk[kRowsPerWarp], seg_k[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    jk[r] = j0 + warp * kRowsPerWarp + r;
    seg_k[r] = seg && jk[r] < p.Tk ? seg[jk[r]] : 0;
#pragma unroll
    for (int c = 0; c < DC; ++c) dk[r][c] = dv[r][c] = 0.f;
  }
  // Query i sees key j only if i + offset >= j: start at the tile holding the first such query.
  const int64_t i_begin = max(int64_t(0), j0 - offset) / kTile * kTile;

  for (int64_t hq = hk * G; hq < (hk + 1) * G; ++hq) {
    const int64_t qoff = (b * p.H + hq) * p.Tq;
    const T* q = static_cast<const T*>(p.q) + qoff * D;        // (Tq, D)
    const T* dout = static_cast<const T*>(p.dout) + qoff * D;  // (Tq, D)
    const T* out = static_cast<const T*>(p.out) + qoff * D;    // (Tq, D)
    for (int64_t i0 = i_begin; i0 < p.Tq; i0 += kTile) {
      __syncthreads();  // the previous tile is consumed
      load_tile(sQ, q, i0, kTile, p.Tq, D, 1);
      load_tile(sdO, dout, i0, kTile, p.Tq, D, 1);
      rowdot(sDelta, dout, out, i0, kTile, p.Tq, D);
      if (threadIdx.x < kTile) {
        const int64_t i = i0 + threadIdx.x;
        sLse2[threadIdx.x] = i < p.Tq ? float(p.lse[qoff + i]) * kLog2e : 0.f;
        sSegQ[threadIdx.x] = seg && i < p.Tq ? seg[i + offset] : 0;
      }
      __syncthreads();

      const int64_t i = i0 + lane;
      float s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = 0.f;
      const float *qi = sQ + lane * ld, *gi = sdO + lane * ld;
      for (int d = 0; d < D; ++d) {
        const float qd = qi[d], gd = gi[d];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          s[r] += qd * sK[(warp * kRowsPerWarp + r) * ld + d];
          dp[r] += gd * sV[(warp * kRowsPerWarp + r) * ld + d];
        }
      }
      float pr[kRowsPerWarp], ds[kRowsPerWarp];
      bool any = false;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const bool ok = i < p.Tq && jk[r] < p.Tk && jk[r] <= i + offset && (!seg || sSegQ[lane] == seg_k[r]);
        pr[r] = ok ? exp2f(s[r] * qk_scale - sLse2[lane]) : 0.f;
        ds[r] = pr[r] * (dp[r] - sDelta[lane]);
        any |= ok;
      }
      if (!__any_sync(0xffffffffu, any)) continue;  // nothing visible: skip the accumulation
      for (int ii = 0; ii < kTile; ++ii) {
        float pj[kRowsPerWarp], dsj[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          pj[r] = __shfl_sync(0xffffffffu, pr[r], ii);
          dsj[r] = __shfl_sync(0xffffffffu, ds[r], ii);
        }
        const float *qr = sQ + ii * ld, *gr = sdO + ii * ld;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int d = lane + 32 * c;
          const float qd = d < D ? qr[d] : 0.f, gd = d < D ? gr[d] : 0.f;
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            dv[r][c] += pj[r] * gd;
            dk[r][c] += dsj[r] * qd;
          }
        }
      }
    }
  }

  T* dkp = static_cast<T*>(p.dk) + koff * D;  // (Tk, D)
  T* dvp = static_cast<T*>(p.dv) + koff * D;  // (Tk, D)
  const float scale = float(p.scale);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (jk[r] >= p.Tk) continue;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) {
        store(dkp + jk[r] * D + d, dk[r][c] * scale);
        store(dvp + jk[r] * D + d, dv[r][c]);
      }
    }
  }
}

}  // namespace
}  // namespace fr::cuda::attn

namespace fr {

void attention_bwd_cuda(const AttnBwdParams& p, cudaStream_t stream) {
  using namespace cuda::attn;
  if (p.B == 0 || p.H == 0 || p.Tk == 0) return;
  const size_t ld = size_t(p.D + 1) * sizeof(float);
  const size_t smem = size_t(2 * kRows + 2 * kTile) * ld;  // both kernels: 2 x 16 rows + 2 x 32 rows
  FR_DISPATCH_HALF_FLOAT(p.dtype, FR_ATTN_DISPATCH_DC(p.D, {
    if (p.Tq > 0) {
      auto* dq = &dq_kernel<scalar_t, DC>;
      set_smem(reinterpret_cast<const void*>(dq), smem);
      dq<<<dim3(unsigned(cuda::ceil_div(p.Tq, kRows)), unsigned(p.H), unsigned(p.B)), kThreads, smem, stream>>>(p);
    }
    auto* dkv = &dkv_kernel<scalar_t, DC>;
    set_smem(reinterpret_cast<const void*>(dkv), smem);
    dkv<<<dim3(unsigned(cuda::ceil_div(p.Tk, kRows)), unsigned(p.Hkv), unsigned(p.B)), kThreads, smem, stream>>>(p);
  }));
  cuda::check_launch("causal_attention_bwd");
}

}  // namespace fr
