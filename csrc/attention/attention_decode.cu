// Causal GQA attention forward for few query rows (Tq < kAttnDecodeTq: KV-cache decoding), split-KV as in
// flash-decoding (Dao et al. 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html). Decoding is
// bound by reading K and V, so the keys of one (b, kv head) are cut into chunks, one per warp; a warp reads
// its chunk once, with 16-byte coalesced loads (several keys in flight per lane), for every query row that
// shares it (all heads of the GQA group, all Tq rows: up to 8 per block, more rows take more row groups),
// and writes a partial softmax state (m, l, o) per row to an fp32 workspace. merge_kernel combines the
// partials into out and lse (natural log, fp64, as the other kernels). k and v may be a KV-cache view:
// planes kv_plane elements apart, rows D apart.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "attention/attention_cuda.cuh"

namespace fr::cuda::decode {
namespace {

using attn::kLn2;
using attn::kLog2e;
constexpr int kWarps = 4;  // warps per block: consecutive chunks of the same (b, kv head, row group)

constexpr int kStages = 3;  // 16-byte loads: a ring of cp.async stages per warp, kStages - 1 steps in flight

// Keys per lane group per step: fewer when the registers for q and o (rows x elements) are many.
__host__ __device__ constexpr int unroll_for(int E, int NV, int RB) { return E == 1 || NV * RB >= 8 ? 2 : 4; }

// Dynamic shared memory of a block: each lane's own 16-byte slots for K and V of every stage (none for
// element loads, which go straight to registers).
constexpr size_t smem_for(int E, int NV, int RB) {
  return E == 1 ? 0 : size_t(kWarps) * kStages * unroll_for(E, NV, RB) * NV * 2 * 32 * 16;
}

// 2^x by the SFU alone (ex2.approx, ~2 ulp, denormal results flushed; -inf -> 0): exp2f adds range
// handling that costs issue slots, which GQA's rows (4-8 per key) make scarce.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// cp.async (sm_80+): a 16-byte global -> shared copy that bypasses registers, so the bytes in flight are
// not bounded by the registers q and o need. fill = false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint4* dst, const void* src, bool fill) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(fill ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// What the host chose for a launch (plan() below), passed to the split kernel.
struct Split {
  int lanes;      // lanes per key (a power of 2 dividing 32): 32 / lanes keys per warp load
  int splits;     // warps (chunks) per (b, kv head, row group): gridDim.y * kWarps
  int64_t chunk;  // keys per warp, a multiple of the keys of one step
};

// E consecutive elements of T read by one 16-byte load (E = 16 / sizeof(T)), or one element (E = 1:
// rows whose byte size or address is not a multiple of 16).
template <class T, int E>
struct Vec {
  using Raw = std::conditional_t<E == 1, T, uint4>;
  static __device__ __forceinline__ Raw load(const T* p) {
    if constexpr (E == 1) return *p;
    else return __ldg(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[E]) {
    if constexpr (E == 1) {
      f[0] = cuda::load(&r);
    } else {
      const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          f[i] = __uint_as_float(w[i]);
        } else if constexpr (std::is_same_v<T, bf16_t>) {
          f[2 * i] = __uint_as_float(w[i] << 16);
          f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
          f[2 * i] = __half2float(__ushort_as_half(uint16_t(w[i] & 0xffffu)));
          f[2 * i + 1] = __half2float(__ushort_as_half(uint16_t(w[i] >> 16)));
        }
      }
    }
  }
};

// One warp = one chunk of keys of one (b, kv head) for RB query rows. Lane g of a group of `lanes` owns the
// elements [(v * lanes + g) * E, + E) of a key row for v < NV; the 32 / lanes groups of a warp (slots) take
// consecutive keys, so a warp load reads 32 / lanes whole rows. Scores in log2 units (exp2, as attention.cu).
template <class T, int E, int NV, int RB>
__global__ void __launch_bounds__(kWarps * 32) split_kernel(AttnFwdParams p, Split s) {
  using V = Vec<T, E>;
  constexpr int U = unroll_for(E, NV, RB);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int L = s.lanes, g = lane & (L - 1), slot = lane / L, KG = 32 / L;
  const int64_t D = p.D, G = p.H / p.Hkv, b = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv;
  const int64_t split = int64_t(blockIdx.y) * kWarps + warp, row0 = int64_t(blockIdx.z) * RB;
  const T* kp = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.kv_plane;  // (Tk, D), rows D apart
  const T* vp = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * p.kv_plane;  // (Tk, D), rows D apart
  const int64_t* seg = p.seg ? p.seg + b * p.Tk : nullptr;                  // (Tk,)
  const float qk_scale = float(p.scale) * kLog2e;

  // Row t of this (b, hk) is query i = t % Tq of head hk * G + t / Tq; rows past G * Tq see no key.
  float q[RB][NV][E], o[RB][NV][E], m[RB], l[RB];
  int64_t pos[RB], seg_q[RB], key_end = 0;
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const int64_t t = row0 + r, i = t % p.Tq, h = hk * G + t / p.Tq;
    const bool valid = t < G * p.Tq;
    pos[r] = valid ? i + p.Tk - p.Tq : -1;
    seg_q[r] = seg && valid ? seg[pos[r]] : 0;
    key_end = max(key_end, pos[r] + 1);
    const T* qr = static_cast<const T*>(p.q) + ((b * p.H + h) * p.Tq + i) * D;  // (D,)
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t d = (v * L + g) * E + e;
        q[r][v][e] = valid && d < D ? cuda::load(qr + d) * qk_scale : 0.f;
        o[r][v][e] = 0.f;
      }
    m[r] = -INFINITY;
    l[r] = 0.f;
  }

  const int64_t c0 = split * s.chunk, c1 = min(c0 + s.chunk, key_end);  // keys past every row's: masked
  const int64_t step = KG * U;
  // The ring (kWarps, kStages, U, NV, 2, 32) of uint4: a lane reads back only the slots its own copies
  // filled, so cp.async.wait_group alone orders them (no barrier).
  extern __shared__ uint4 ring[];
  uint4* mine = ring + warp * (kStages * U * NV * 2 * 32) + lane;
  const auto at = [&](int st, int u, int v, int kv) { return mine + (((st * U + u) * NV + v) * 2 + kv) * 32; };
  const auto issue = [&](int st, int64_t j0) {  // keys >= c1 and lanes past D: zeros (0 * junk could be NaN)
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int64_t jj = j0 + u * KG + slot, d0 = (v * L + g) * E;
        const bool in = jj < c1 && d0 < D;
        const int64_t off = in ? jj * D + d0 : 0;
        cp_async16(at(st, u, v, 0), kp + off, in);
        cp_async16(at(st, u, v, 1), vp + off, in);
      }
    cp_async_commit();
  };
  constexpr bool kAsync = E > 1;
  if constexpr (kAsync)
    for (int st = 0; st < kStages - 1; ++st) issue(st, c0 + st * step);
  int st_use = 0;
  for (int64_t j0 = c0; j0 < c1; j0 += step) {
    typename V::Raw kr[U][NV], vr[U][NV];
    int64_t j[U], seg_k[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      j[u] = j0 + u * KG + slot;
      seg_k[u] = seg && j[u] < c1 ? seg[j[u]] : 0;
    }
    if constexpr (kAsync) {
      issue((st_use + kStages - 1) % kStages, j0 + (kStages - 1) * step);  // the slot read last step
      cp_async_wait<kStages - 1>();                                          // this step's copies landed
    } else {  // element loads, all of the step's first
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int64_t d0 = (v * L + g) * E;
          const bool in = j[u] < c1 && d0 < D;
          kr[u][v] = in ? V::load(kp + j[u] * D + d0) : typename V::Raw{};
          vr[u][v] = in ? V::load(vp + j[u] * D + d0) : typename V::Raw{};
        }
    }
    // K, V of key u, vector v: from the ring (read where used, to save registers) or the registers
    const auto kraw = [&](int u, int v) {
      if constexpr (kAsync) return *at(st_use, u, v, 0);
      else return kr[u][v];
    };
    const auto vraw = [&](int u, int v) {
      if constexpr (kAsync) return *at(st_use, u, v, 1);
      else return vr[u][v];
    };
    float sc[U][RB];  // scores, then probabilities
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[NV][E];
#pragma unroll
      for (int v = 0; v < NV; ++v) V::unpack(kraw(u, v), kf[v]);
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        float acc = 0.f;
#pragma unroll
        for (int v = 0; v < NV; ++v)
#pragma unroll
          for (int e = 0; e < E; ++e) acc = fmaf(q[r][v][e], kf[v][e], acc);
        sc[u][r] = acc;
      }
    }
    for (int off = L >> 1; off > 0; off >>= 1)  // sum over the lanes of a key (all lanes take part)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < RB; ++r) sc[u][r] += __shfl_xor_sync(0xffffffffu, sc[u][r], off);

    float alpha[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool ok = j[u] < c1 && j[u] <= pos[r] && (!seg || seg_k[u] == seg_q[r]);
        sc[u][r] = ok ? sc[u][r] : -INFINITY;
        mx = fmaxf(mx, sc[u][r]);
      }
      if (mx == -INFINITY) {  // nothing visible to this row yet: the state stays empty
        alpha[r] = 1.f;
#pragma unroll
        for (int u = 0; u < U; ++u) sc[u][r] = 0.f;
        continue;
      }
      alpha[r] = fast_exp2(m[r] - mx);  // 0 while m was -inf
      float ps = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        sc[u][r] = fast_exp2(sc[u][r] - mx);  // 0 for masked keys
        ps += sc[u][r];
      }
      l[r] = l[r] * alpha[r] + ps;
      m[r] = mx;
    }
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
      for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < E; ++e) o[r][v][e] *= alpha[r];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[NV][E];
#pragma unroll
      for (int v = 0; v < NV; ++v) V::unpack(vraw(u, v), vf[v]);
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int v = 0; v < NV; ++v)
#pragma unroll
          for (int e = 0; e < E; ++e) o[r][v][e] = fmaf(sc[u][r], vf[v][e], o[r][v][e]);
    }
    st_use = st_use + 1 == kStages ? 0 : st_use + 1;
  }

  if constexpr (kAsync) cp_async_wait<0>();  // no copy into shared memory outlives the block

  // Merge the slots of the warp (lanes L, 2L, ... apart own the same elements); slot 0 ends with the chunk's.
  for (int off = L; off < 32; off <<= 1) {
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[r], off), lo = __shfl_xor_sync(0xffffffffu, l[r], off);
      const float mx = fmaxf(m[r], mo);
      const float a = mx == -INFINITY ? 0.f : fast_exp2(m[r] - mx), c = mx == -INFINITY ? 0.f : fast_exp2(mo - mx);
      l[r] = l[r] * a + lo * c;
      m[r] = mx;
#pragma unroll
      for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float oo = __shfl_xor_sync(0xffffffffu, o[r][v][e], off);
          o[r][v][e] = o[r][v][e] * a + oo * c;
        }
    }
  }
  if (slot != 0) return;
  const int64_t rows = p.B * p.H * p.Tq;
  float* ws_o = p.work;                         // (B * H * Tq, splits, D)
  float* ws_ml = p.work + rows * s.splits * D;  // (B * H * Tq, splits, 2): m (log2 units), l
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const int64_t t = row0 + r;
    if (t >= G * p.Tq) continue;
    const int64_t part = ((b * p.H + hk * G + t / p.Tq) * p.Tq + t % p.Tq) * s.splits + split;
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t d = (v * L + g) * E + e;
        if (d < D) ws_o[part * D + d] = o[r][v][e];
      }
    if (lane == 0) {
      ws_ml[2 * part] = m[r];
      ws_ml[2 * part + 1] = l[r];
    }
  }
}

// One warp per query row (b, h, i): out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s.
// Chunks with no visible key have m = -inf, l = 0, o = 0; every row sees its own key, so M is finite.
template <class T>
__global__ void __launch_bounds__(128) merge_kernel(AttnFwdParams p, int splits) {
  const int64_t rows = p.B * p.H * p.Tq, row = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= rows) return;  // uniform across the warp
  const int lane = threadIdx.x & 31;
  const int64_t D = p.D;
  const float* o = p.work + row * splits * D;                   // (splits, D)
  const float* ml = p.work + rows * splits * D + row * splits * 2;  // (splits, 2)
  float M = -INFINITY;
  for (int s = lane; s < splits; s += 32) M = fmaxf(M, ml[2 * s]);
  M = warp_max(M);
  float l = 0.f;
  for (int s = lane; s < splits; s += 32) l += ml[2 * s + 1] * exp2f(ml[2 * s] - M);
  l = warp_sum(l);
  const float inv_l = 1.f / l;
  T* out = static_cast<T*>(p.out) + row * D;  // (D,)
  for (int64_t d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc = fmaf(o[s * D + d], exp2f(ml[2 * s] - M), acc);
    store(out + d, acc * inv_l);
  }
  if (lane == 0) p.lse[row] = double((M + log2f(l)) * kLn2);
}

using SplitFn = void (*)(AttnFwdParams, Split);

template <class T, int E, int NV>
SplitFn pick_rows(int rb) {
  switch (rb) {
    case 1: return split_kernel<T, E, NV, 1>;
    case 2: return split_kernel<T, E, NV, 2>;
    case 4: return split_kernel<T, E, NV, 4>;
    default: return split_kernel<T, E, NV, 8>;
  }
}

template <class T>
SplitFn pick(bool vec, int nv, int rb) {
  constexpr int EV = 16 / sizeof(T);
  if (!vec) return split_kernel<T, 1, 8, 8>;  // up to 32 x 8 = 256 elements per row, one at a time
  if constexpr (EV == 4) {
    if (nv == 2) return pick_rows<T, EV, 2>(rb);  // fp32 rows of more than 128 elements
  }
  return pick_rows<T, EV, 1>(rb);
}

struct Plan {
  SplitFn fn;
  size_t smem;
  Split split;
  int row_groups;
};

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Resident blocks of `fn` on the current device, cached per thread (the queries cost microseconds per step);
// also raises fn's dynamic shared-memory limit there, before the occupancy query and any launch.
int64_t capacity(SplitFn fn, size_t smem) {
  struct Entry {
    int dev;
    SplitFn fn;
    int64_t blocks;
  };
  thread_local std::vector<Entry> cache;
  int dev = 0, sms = 0, per_sm = 0;
  check(cudaGetDevice(&dev), "attention decode: current device");
  for (const Entry& e : cache)
    if (e.dev == dev && e.fn == fn) return e.blocks;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "attention decode: SM count");
  check(cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem)),
        "attention decode: shared-memory limit");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kWarps * 32, smem), "attention decode: occupancy");
  cache.push_back({dev, fn, int64_t(std::max(per_sm, 1)) * sms});
  return cache.back().blocks;
}

// The launch for p: lanes per key from D and the load width, rows per block from H / Hkv * Tq, and the
// blocks (chunks of kWarps warps) per (b, kv head, row group): the fewest whose last wave of equal blocks
// is nearly full (a part-filled last wave runs with too few loads in flight), with >= 4 steps per warp.
Plan plan(const AttnFwdParams& p) {
  const int es = p.dtype == DType::f32 ? 4 : 2;
  const bool vec = (p.D * es) % 16 == 0 && (p.kv_plane * es) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.k) % 16 == 0 && reinterpret_cast<uintptr_t>(p.v) % 16 == 0;
  const int E = vec ? 16 / es : 1;
  const int64_t n = ceil_div(p.D, E);  // loads per key row
  const int nv = vec ? (n > 32 ? 2 : 1) : 8;
  const int lanes = vec ? next_pow2(ceil_div(n, nv)) : 32;
  const int64_t R = p.H / p.Hkv * p.Tq;
  const int rb = !vec || R > 4 ? 8 : R > 2 ? 4 : R > 1 ? 2 : 1;
  Plan pl;
  FR_DISPATCH_HALF_FLOAT(p.dtype, pl.fn = pick<scalar_t>(vec, nv, rb));
  pl.row_groups = int(ceil_div(R, rb));
  const int64_t step = (32 / lanes) * unroll_for(E, nv, rb);  // keys per warp step
  pl.smem = smem_for(E, nv, rb);
  const int64_t pairs = p.B * p.Hkv * pl.row_groups, cap = capacity(pl.fn, pl.smem);
  const int64_t most = std::min<int64_t>(ceil_div(p.Tk, 4 * step * kWarps), 4 * cap / pairs + 1);
  int64_t blocks = 1;  // per (b, hk, row group)
  double best = 0.0;
  for (int64_t n = 1; n <= most; ++n) {
    const double waves = double(pairs * n) / double(cap), fill = waves / std::ceil(waves);
    if (fill > best + 0.02) {  // more chunks only for a clearly fuller last wave
      blocks = n;
      best = fill;
    }
  }
  pl.split.lanes = lanes;
  pl.split.splits = int(blocks * kWarps);
  pl.split.chunk = ceil_div(ceil_div(p.Tk, pl.split.splits), step) * step;
  return pl;
}

}  // namespace
}  // namespace fr::cuda::decode

namespace fr {

int64_t attention_fwd_cuda_workspace(const AttnFwdParams& p) {
  if (p.Tq >= kAttnDecodeTq || p.B == 0 || p.H == 0 || p.Tq == 0) return 0;
  return p.B * p.H * p.Tq * cuda::decode::plan(p).split.splits * (p.D + 2);
}

void attention_decode_cuda(const AttnFwdParams& p, cudaStream_t stream) {
  using namespace cuda::decode;
  if (p.B == 0 || p.H == 0 || p.Tq == 0) return;
  const Plan pl = plan(p);
  const dim3 grid(unsigned(p.B * p.Hkv), unsigned(pl.split.splits / kWarps), unsigned(pl.row_groups));
  pl.fn<<<grid, kWarps * 32, pl.smem, stream>>>(p, pl.split);
  const int64_t rows = p.B * p.H * p.Tq;
  FR_DISPATCH_HALF_FLOAT(p.dtype, merge_kernel<scalar_t>
                         <<<unsigned(cuda::ceil_div(rows, 4)), 128, 0, stream>>>(p, pl.split.splits));
  cuda::check_launch("causal_attention_fwd (decode)");
}

}  // namespace fr
