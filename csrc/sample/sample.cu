// The sampler on the GPU: one block per row, no sort and no (B, V) temporary. Same rule as the CPU
// kernel (sample.h): the allowed set is {x >= tau} (top-k and top-p each keep a prefix of the logits
// sorted descending) intersected with min-p's {e >= min_p}, e = p / p_max = 2^((x - max) log2(e) / T);
// the token is the first index whose inclusive running sum of allowed e exceeds u * (their total),
// u = philox_uniform(seed, row, 0): the same Philox stream as the CPU, so the same seed gives the same
// tokens (up to the last bits of the sums when a draw lands exactly on a boundary).
// Thresholds by radix select over order-preserving integer keys of the logits (MSB first, 8 bits a
// pass, a 256-bin shared histogram): top-k counts elements, top-p sums their mass in 2^-32 fixed point
// so the integer atomics add up the same in any order. Every sum is deterministic run after run.
#include <cfloat>

#include "common/cuda_ops.h"
#include "common/cuda_utils.cuh"
#include "common/philox.h"

namespace fr::cuda {
namespace {

constexpr int kThreads = 512;
constexpr double kLog2e = 1.4426950408889634;

// Order-preserving unsigned keys (-0 counts as +0, as the comparisons do).
__device__ __forceinline__ uint32_t key_of(float f) {
  const uint32_t u = __float_as_uint(f + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float val_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ uint64_t key_of(double f) {
  const uint64_t u = uint64_t(__double_as_longlong(f + 0.0));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}
__device__ __forceinline__ double val_of(uint64_t k) {
  return __longlong_as_double((long long)((k >> 63) ? (k & ~(1ull << 63)) : ~k));
}
template <class A> struct KeyOf { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

__device__ __forceinline__ float next_up(float x) { return nextafterf(x, INFINITY); }
__device__ __forceinline__ double next_up(double x) { return nextafter(x, double(INFINITY)); }

struct Shared {
  unsigned int count[256];
  unsigned long long mass[256];
  double dscratch[32];
  int64_t iscratch[32];
  uint64_t pick;  // the walk's results, broadcast
  double pick_above;
  unsigned long long pick_mass;
};

// Radix walk for one digit: thread 0 picks a bin, all threads get it. Top-k: the bin holding the
// `remaining`-th largest. Top-p: the lowest non-empty bin whose mass above (strictly larger keys) is
// < target. Returns the bin; updates remaining / above.
__device__ int walk_topk(Shared& sh, int64_t& remaining) {
  if (threadIdx.x == 0) {
    int64_t r = remaining;
    int b = 255;
    for (; b > 0; --b) {
      if (int64_t(sh.count[b]) >= r) break;
      r -= sh.count[b];
    }
    sh.pick = uint64_t(b);
    sh.pick_above = double(r);
  }
  __syncthreads();
  remaining = int64_t(sh.pick_above);
  return int(sh.pick);
}

__device__ int walk_topp(Shared& sh, unsigned long long& above, double target) {
  if (threadIdx.x == 0) {
    unsigned long long a = above, chosen_above = above;
    int chosen = -1;
    for (int b = 255; b >= 0; --b) {
      if (sh.count[b] == 0) continue;
      if (!(double(a) < target)) break;
      chosen = b;
      chosen_above = a;
      a += sh.mass[b];
    }
    sh.pick = uint64_t(chosen < 0 ? 0 : chosen);  // chosen >= 0: the walk starts with above < target
    sh.pick_above = double(chosen_above);
    sh.pick_mass = chosen_above;
  }
  __syncthreads();
  above = sh.pick_mass;
  return int(sh.pick);
}

// Scan of one value per thread in thread order: thread t gets [lo, hi) with lo = the sum over the
// threads before it and hi = the next thread's lo, both from the same rounded partial sums, so the
// intervals tile [0, *total) exactly (floating adds of non-negatives are monotone).
__device__ void block_scan_interval(double v, double* scratch, double* lo, double* hi, double* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  double incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  const double prev = __shfl_up_sync(0xffffffffu, incl, 1);
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {  // the warps' offsets, in warp order
    double run = 0;
    for (int w = 0; w < nwarps; ++w) {
      const double t = scratch[w];
      scratch[w] = run;
      run = run + t;
    }
    scratch[31] = run;
  }
  __syncthreads();
  const double off = scratch[warp];
  *lo = lane == 0 ? off : off + prev;
  *hi = lane == 31 ? (warp + 1 < nwarps ? scratch[warp + 1] : scratch[31]) : off + incl;
  *total = scratch[31];
}

template <class T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleParams p) {
  using A = acc_t<T>;
  using Key = typename KeyOf<A>::type;
  __shared__ Shared sh;
  const int64_t row = blockIdx.x, V = p.V;
  const T* x = static_cast<const T*>(p.logits) + row * V;  // (V,)
  const int tid = threadIdx.x;

  // Per-row parameters live on the device: check them here, report by status.
  const double temp = p.temperature[row], top_p = p.top_p[row], min_p = p.min_p[row];
  const int64_t top_k = p.top_k[row];
  auto fail = [&](uint8_t status) {
    if (tid == 0) {
      p.status[row] = status;
      p.tokens[row] = 0;
      p.logprobs[row] = NAN;
    }
  };
  if (!(isfinite(temp) && temp >= 0)) return fail(kRowBadTemperature);
  if (top_k < 0) return fail(kRowBadTopK);
  if (!(top_p > 0 && top_p <= 1)) return fail(kRowBadTopP);
  if (!(min_p >= 0 && min_p <= 1)) return fail(kRowBadMinP);

  // Pass 1: max, NaN and +inf flags.
  A m = A(-INFINITY);
  int64_t flags = 0;  // 1 = NaN, 2 = +inf
  for (int64_t i = tid; i < V; i += kThreads) {
    const A v = load(x + i);
    if (v != v) flags |= 1;
    else if (v == A(INFINITY)) flags |= 2;
    else m = max(m, v);
  }
  m = block_reduce(m, A(-INFINITY), Max(), reinterpret_cast<A*>(sh.dscratch));
  flags = block_reduce(flags, int64_t(0), [](int64_t a, int64_t b) { return a | b; }, sh.iscratch);
  if (flags & 1) return fail(kRowNaN);
  if (flags & 2) return fail(kRowPosInf);
  if (m == A(-INFINITY)) return fail(kRowAllNegInf);

  // 1 / T is capped so that a tiny temperature cannot make 0 * inf = NaN at the max.
  const double inv_t = temp > 0 ? min(1.0 / temp, DBL_MAX) : 1.0;
  const A c = A(min(inv_t * kLog2e, double(sizeof(A) == 4 ? FLT_MAX : DBL_MAX)));
  auto e_of = [&](A v) { return exp2((v - m) * c); };  // p / p_max, in (0, 1] for finite v

  // Pass 2: Z = sum e over the row (the unfiltered softmax of the logprob).
  double z = 0;
  for (int64_t i = tid; i < V; i += kThreads) z += double(e_of(load(x + i)));
  z = block_reduce(z, 0.0, Sum(), sh.dscratch);

  int64_t token;
  if (temp == 0) {  // greedy: the first argmax, its log-prob at T = 1
    int64_t first = INT64_MAX;
    for (int64_t i = tid; i < V && first == INT64_MAX; i += kThreads)
      if (load(x + i) == m) first = i;
    token = block_reduce(first, int64_t(INT64_MAX), Min(), sh.iscratch);
  } else {
    // Top-k: the k-th largest key, by counts (ties kept: x >= vk).
    const int64_t k = top_k < V ? top_k : 0;
    A lo = A(-INFINITY);
    constexpr int kBits = int(sizeof(Key)) * 8;
    if (k > 0) {
      Key prefix = 0, mask = 0;
      int64_t remaining = k;
      for (int shift = kBits - 8; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += kThreads) sh.count[b] = 0;
        __syncthreads();
        for (int64_t i = tid; i < V; i += kThreads) {
          const Key key = key_of(load(x + i));
          if ((key & mask) == prefix) atomicAdd(&sh.count[(key >> shift) & 0xff], 1u);
        }
        __syncthreads();
        const int b = walk_topk(sh, remaining);
        prefix |= Key(b) << shift;
        mask |= Key(0xff) << shift;
      }
      lo = val_of(prefix);
    }
    // Top-p over the top-k survivors: the lowest survivor value whose mass above is < top_p * Zk.
    if (top_p < 1) {
      const A vk = lo;
      Key prefix = 0, mask = 0;
      unsigned long long above = 0;
      double target = 0;
      for (int shift = kBits - 8; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += kThreads) sh.count[b] = 0, sh.mass[b] = 0;
        __syncthreads();
        for (int64_t i = tid; i < V; i += kThreads) {
          const A v = load(x + i);
          const Key key = key_of(v);
          if (v >= vk && (key & mask) == prefix) {
            const int b = int((key >> shift) & 0xff);
            atomicAdd(&sh.count[b], 1u);
            atomicAdd(&sh.mass[b], (unsigned long long)(double(e_of(v)) * 4294967296.0 + 0.5));
          }
        }
        __syncthreads();
        if (shift == kBits - 8) {  // the first level sees every survivor: Zk in fixed point
          unsigned long long zk = 0;
          for (int b = 0; b < 256; ++b) zk += sh.mass[b];
          target = top_p * double(zk);
        }
        const int b = walk_topp(sh, above, target);
        prefix |= Key(b) << shift;
        mask |= Key(0xff) << shift;
        __syncthreads();  // the histogram is cleared next
      }
      lo = val_of(prefix);
    }
    // min-p: the smallest A value thr with thr >= min_p, so that e >= thr <=> e >= min_p.
    A thr = A(min_p);
    if (double(thr) < min_p) thr = next_up(thr);
    auto allowed = [&](A v) -> double {
      if (!(v >= lo)) return 0.0;
      const A e = e_of(v);
      return e >= thr ? double(e) : 0.0;
    };
    // Draw: thread t owns the contiguous chunk [t C, (t + 1) C); the scan of the chunk sums
    // tiles [0, total), so one thread owns u * total and walks its chunk for it.
    const int64_t C = ceil_div(V, kThreads), b0 = min(V, int64_t(tid) * C), b1 = min(V, b0 + C);
    double own = 0;
    int64_t last_allowed = -1;
    for (int64_t i = b0; i < b1; ++i) {
      const double e = allowed(load(x + i));
      own += e;
      if (e > 0) last_allowed = i;
    }
    double lo_sum, hi_sum, total;
    block_scan_interval(own, sh.dscratch, &lo_sum, &hi_sum, &total);
    const double target = philox_uniform(p.seed, uint64_t(row), 0) * total;
    int64_t mine = INT64_MAX;
    if (lo_sum <= target && target < hi_sum) {
      double cum = lo_sum;
      for (int64_t i = b0; i < b1; ++i) {
        const double e = allowed(load(x + i));
        if (e <= 0) continue;
        cum += e;
        mine = i;
        if (cum > target) break;
      }  // rounding left the target unreached: the chunk's last allowed token
    }
    token = block_reduce(mine, int64_t(INT64_MAX), Min(), sh.iscratch);
    // u * total rounded up to total: no chunk holds it; the row's last allowed token (as the CPU)
    last_allowed = block_reduce(last_allowed, int64_t(-1), Max(), sh.iscratch);
    if (token == INT64_MAX) token = last_allowed;
  }
  if (tid == 0) {
    p.status[row] = kRowOk;
    p.tokens[row] = token;
    p.logprobs[row] = float(double(load(x + token) - m) * inv_t - log(z));
  }
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

void sample_cuda(const SampleParams& p, uint8_t* status_host, cudaStream_t stream) {
  if (p.B == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, { cuda::sample_kernel<scalar_t><<<unsigned(p.B), cuda::kThreads, 0, stream>>>(p); });
  cuda::check_launch("sample");
  cuda::check(cudaMemcpyAsync(status_host, p.status, size_t(p.B), cudaMemcpyDeviceToHost, stream),
              "sample: copy status back");
  cuda::check(cudaStreamSynchronize(stream), "sample: sync");
}

}  // namespace fr
