// Causal GQA attention forward on tensor cores (bf16/fp16, D in {64, 128}), FlashAttention-2 style
// (Dao 2023, arXiv 2307.08691) on mma.sync m16n8k16 with fp32 accumulators. A block of 4 warps owns 128
// query rows (32 per warp) and walks key tiles of 64 up to its last visible key: K/V tiles arrive by 16-byte
// cp.async into two shared-memory stages (tile t + 1 loads while t is computed), rows XOR-swizzled in
// 16-byte chunks (chunk c of row r lives at c ^ (r & 7)) so ldmatrix and cp.async hit 32 distinct banks.
// S = Q K^T stays in registers, the online softmax runs in exp2 units, and the S accumulators are re-packed
// to bf16/fp16 as the A operand of P V (no shared-memory round trip). Masks (causal, Tk end, segment ids)
// are applied only on tiles that need them. Grid (B * H, query tiles), the last (heaviest) query tiles
// first, so that the short causal tiles fill the tail. Same contract as the scalar kernel in attention.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/attention_cuda.cuh"

namespace fr::cuda::attn {
namespace {

template <class T> struct MmaType;
template <> struct MmaType<bf16_t> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaType<f16_t> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}
// 16-byte async copy; src_bytes = 0 writes zeros (rows past the end), src must still be a valid address.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Element offset of 16-byte chunk c of row r in a swizzled (rows, D) tile.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// Copies rows [r0, r0 + rows) of src (R, D) into the swizzled tile dst; rows >= R become zeros.
template <int D, int rows, class T>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ src, int64_t r0, int64_t R) {
  constexpr int kChunks = D / 8;
  static_assert(rows * kChunks % kThreads == 0, "whole rounds of 16-byte copies");
#pragma unroll
  for (int it = 0; it < rows * kChunks / kThreads; ++it) {
    const int i = threadIdx.x + it * kThreads, r = i / kChunks, c = i % kChunks;
    const bool in = r0 + r < R;
    cp_async16(smem_addr(dst + swz<D>(r, c)), src + (in ? (r0 + r) * D + c * 8 : 0), in ? 16 : 0);
  }
}

// MT m16 tiles per warp (16 * MT query rows): each K/V fragment read from shared memory feeds MT mma
// pairs, so MT = 2 halves the shared-memory traffic per mma (the limit at MT = 1). QREG keeps the Q
// fragments in registers for the whole loop; without it they are re-read from shared memory per k-step
// (D = 128, MT = 2 has no registers to spare for them).
template <class T, int D, int MT, int kN, bool QREG>
__global__ void __launch_bounds__(kThreads) fwd_mma_kernel(AttnFwdParams p) {
  using M = MmaType<T>;
  constexpr int kM = 4 * 16 * MT;  // query rows per block
  constexpr int kKD = D / 16;      // k-steps of Q K^T
  constexpr int kND = D / 8;       // n-tiles of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kM, D) swizzled
  T* sK = sQ + kM * D;                     // (2, kN, D) swizzled, two stages
  T* sV = sK + 2 * kN * D;                 // (2, kN, D)
  __shared__ int64_t sSeg[2][kN];

  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int64_t q0 = int64_t(gridDim.y - 1 - blockIdx.y) * kM;  // heaviest (last) query tiles launch first
  const int64_t offset = p.Tk - p.Tq;                             // query i sits at position i + offset
  const int64_t plane = p.kv_plane > 0 ? p.kv_plane : p.Tk * D;
  const T* q = static_cast<const T*>(p.q) + bh * p.Tq * D;           // (Tq, D)
  const T* k = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * plane;  // (Tk, D) rows D apart
  const T* v = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * plane;  // (Tk, D)
  const int64_t* seg = p.seg ? p.seg + b * p.Tk : nullptr;            // (Tk,)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wrow = warp * 16 * MT;  // the warp's first row in the block

  // Keys past the block's last visible one are never loaded.
  const int64_t k_end = min(p.Tk, min(q0 + kM, p.Tq) + offset);
  const int n_tiles = int(ceil_div(k_end, kN));
  auto load_kv = [&](int tile, int stage) {
    const int64_t k0 = int64_t(tile) * kN;
    load_tile_async<D, kN>(sK + stage * kN * D, k, k0, p.Tk);
    load_tile_async<D, kN>(sV + stage * kN * D, v, k0, p.Tk);
    if (seg && threadIdx.x < kN) sSeg[stage][threadIdx.x] = k0 + threadIdx.x < p.Tk ? seg[k0 + threadIdx.x] : 0;
  };
  load_tile_async<D, kM>(sQ, q, q0, p.Tq);
  load_kv(0, 0);
  cp_async_commit();

  // This thread's rows: g and g + 8 of each of the warp's m-tiles (block row wrow + 16 mt + g + 8 r).
  // Padding rows (past Tq) compute but never write. No per-row 64-bit state: registers are short.
  float m[MT][2], l[MT][2], o[MT][kND][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[mt][r] = -INFINITY;
      l[mt][r] = 0.f;
#pragma unroll
      for (int n = 0; n < kND; ++n) o[mt][n][2 * r] = o[mt][n][2 * r + 1] = 0.f;
    }
  const float qk_scale = float(p.scale) * kLog2e;
  uint32_t qa[QREG ? MT : 1][QREG ? kKD : 1][4];
  auto q_frag = [&](uint32_t* r, int mt, int kk) {
    ldsm_x4(r, smem_addr(sQ + swz<D>(wrow + 16 * mt + (lane & 15), 2 * kk + (lane >> 4))));
  };

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    cp_async_wait_all();
    __syncthreads();  // tile `tile` is visible to all; everyone is done with the other stage
    if (tile + 1 < n_tiles) load_kv(tile + 1, stage ^ 1);
    cp_async_commit();
    if (QREG && tile == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < kKD; ++kk) q_frag(qa[QREG ? mt : 0][QREG ? kk : 0], mt, kk);
    }
    const T* tK = sK + stage * kN * D;
    const T* tV = sV + stage * kN * D;

    // S = Q K^T (16 MT x 64 per warp): n-tile j holds keys 8j..8j+7.
    float s[MT][kN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKD; ++kk) {
      uint32_t qk[QREG ? 1 : MT][4];
      if (!QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) q_frag(qk[QREG ? 0 : mt], mt, kk);
      }
#pragma unroll
      for (int jp = 0; jp < kN / 16; ++jp) {
        uint32_t bk[4];  // keys 16jp + (0..7 | 8..15) x d-halves of this k-step
        ldsm_x4(bk, smem_addr(tK + swz<D>(16 * jp + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1))));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t* a = QREG ? qa[QREG ? mt : 0][QREG ? kk : 0] : qk[QREG ? 0 : mt];
          M::mma(s[mt][2 * jp], a, bk[0], bk[1]);
          M::mma(s[mt][2 * jp + 1], a, bk[2], bk[3]);
        }
      }
    }

    // Scale to log2 units and mask where this tile needs it.
    // Key k0 + jj is visible to block row i iff jj - i <= diag (causal) and jj < kend (Tk).
    const int64_t k0 = int64_t(tile) * kN;
    const bool need_mask = seg || k0 + kN > p.Tk || k0 + kN - 1 > q0 + offset;
    const int diag = int(min(q0 + offset - k0, int64_t(kN))), kend = int(min(p.Tk - k0, int64_t(kN)));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = wrow + 16 * mt + g + 8 * r;
        const int64_t seg_q = seg && q0 + i < p.Tq ? seg[q0 + i + offset] : 0;
#pragma unroll
        for (int j = 0; j < kN / 8; ++j)
#pragma unroll
          for (int c = 2 * r; c < 2 * r + 2; ++c) {
            float x = s[mt][j][c] * qk_scale;
            if (need_mask) {
              const int jj = 8 * j + 2 * t + (c & 1);
              const bool ok = jj - i <= diag && jj < kend && (!seg || sSeg[stage][jj] == seg_q);
              x = ok ? x : -INFINITY;
            }
            s[mt][j][c] = x;
          }
      }

    // Online softmax per row; the 4 threads of a quad share a row.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m[mt][r];
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet stays at zero
        const float alpha = fast_exp2(m[mt][r] - base);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
          s[mt][j][2 * r] = fast_exp2(s[mt][j][2 * r] - base);
          s[mt][j][2 * r + 1] = fast_exp2(s[mt][j][2 * r + 1] - base);
          sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
        }
        l[mt][r] = l[mt][r] * alpha + sum;  // this thread's partial row sum: the quad is summed at the end
        m[mt][r] = mx;
#pragma unroll
        for (int n = 0; n < kND; ++n) {
          o[mt][n][2 * r] *= alpha;
          o[mt][n][2 * r + 1] *= alpha;
        }
      }

    // O += P V: P's accumulator layout is the A fragment of keys 16kk..16kk+15.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = M::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = M::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = M::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = M::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < kND / 2; ++np) {
        uint32_t bv[4];  // keys (0..7 | 8..15) of this k-step x d-columns 16np + (0..7 | 8..15)
        ldsm_x4_t(bv, smem_addr(tV + swz<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * np + (lane >> 4))));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::mma(o[mt][2 * np], pa[mt], bv[0], bv[1]);
          M::mma(o[mt][2 * np + 1], pa[mt], bv[2], bv[3]);
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out) + bh * p.Tq * D;  // (Tq, D)
  double* lse = p.lse + bh * p.Tq;                   // (Tq,)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[mt][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      const int64_t i = q0 + wrow + 16 * mt + g + 8 * r;
      if (i >= p.Tq) continue;
      const float inv_l = 1.f / lr;  // l >= 1: every query sees its own key
#pragma unroll
      for (int n = 0; n < kND; ++n)
        *reinterpret_cast<uint32_t*>(out + i * D + 8 * n + 2 * t) =
            M::pack(o[mt][n][2 * r] * inv_l, o[mt][n][2 * r + 1] * inv_l);
      if (t == 0) lse[i] = double((m[mt][r] + log2f(lr)) * kLn2);
    }
}

template <class T, int D, int MT, int kN>
void launch_variant(const AttnFwdParams& p, cudaStream_t stream) {
  constexpr bool QREG = MT == 1 || D == 64;
  constexpr int kM = 4 * 16 * MT;
  const size_t smem = size_t(kM + 4 * kN) * D * sizeof(T);
  const dim3 grid(unsigned(p.B * p.H), unsigned(ceil_div(p.Tq, kM)));
  auto* kernel = &fwd_mma_kernel<T, D, MT, kN, QREG>;
  set_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<grid, kThreads, smem, stream>>>(p);
}

// MT = 2, kN = 64 measured fastest on an H100 of (MT, kN) in {(1, 64), (2, 64), (2, 32), (1, 128)} (D = 128,
// T = 8k: 291, 301, 291, 160 TFLOP/s). At D = 128 it spills ~100 bytes (255 registers); skipping the O
// rescale when no row max moved (a warp vote) spilled more and ran ~2 % slower.
template <class T, int D>
void launch(const AttnFwdParams& p, cudaStream_t stream) {
  launch_variant<T, D, 2, 64>(p, stream);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

bool fwd_mma(const AttnFwdParams& p, cudaStream_t stream) {
  const bool half = p.dtype == DType::bf16 || p.dtype == DType::f16;
  const int64_t plane = p.kv_plane > 0 ? p.kv_plane : p.Tk * p.D;
  // 16-byte copies need 16-byte aligned rows; gridDim.y caps the query tiles.
  if (!half || (p.D != 64 && p.D != 128) || p.Tq < 16 || ceil_div(p.Tq, 16) > 65535 || plane % 8 != 0 ||
      !aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out))
    return false;
  if (p.dtype == DType::bf16) {
    if (p.D == 64) launch<bf16_t, 64>(p, stream);
    else launch<bf16_t, 128>(p, stream);
  } else {
    if (p.D == 64) launch<f16_t, 64>(p, stream);
    else launch<f16_t, 128>(p, stream);
  }
  check_launch("causal_attention_fwd (tensor cores)");
  return true;
}

}  // namespace fr::cuda::attn
