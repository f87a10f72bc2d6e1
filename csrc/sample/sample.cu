// The sampler on the GPU: one block per row, no sort and no (B, V) temporary. Same rule as the CPU
// kernel (sample.h): the allowed set is {x >= tau} (top-k and top-p each keep a prefix of the logits
// sorted descending) intersected with min-p's {e >= min_p}, e = p / p_max = 2^((x - max) log2(e) / T);
// the token is the first index whose inclusive running sum of allowed e exceeds u * (their total),
// u = philox_uniform(seed, row, 0): the same Philox stream as the CPU, so the same seed gives the same
// tokens (up to the last bits of the sums when a draw lands exactly on a boundary).
// Thresholds from a histogram: the softmax pass also bins every token by d = (max - x) log2(e) / T in
// 1/16ths of a bit (2048 bins, monotone in x), counting tokens for top-k and summing e in 2^-32 fixed
// point for top-p, so the integer atomics add up the same in any order. The bins give the one bin
// range that holds the top-k and top-p boundaries; a second pass gathers its tokens' keys into shared
// memory, sorts them and finds the exact thresholds there (top-p's mass above the range is exact too).
// Rows whose range holds too many tokens (ties, flat rows) fall back to radix select over the row,
// 8 bits a pass. The draw sums the allowed mass of 64 index-ordered segments, then one warp walks the
// segment holding u * total. Every pass uses 16-byte loads where the row is aligned; every sum is
// deterministic run after run.
#include <cfloat>

#include "sample/sample.h"
#include "common/cuda_utils.cuh"
#include "common/philox.h"

namespace fr::cuda {
namespace {

constexpr int kThreads = 512, kWarps = kThreads / 32;
constexpr double kLog2e = 1.4426950408889634;
constexpr int kBins = 2048;        // histogram bins of d = (max - x) * log2(e) / T ...
constexpr float kBinsPerBit = 16;  // ... 16 to a bit: d >= 128 shares the last bin
constexpr int kPoolBytes = 32768;  // the histogram, then the gathered keys of the boundary bins
constexpr int kSegs = 64;          // the draw's index-ordered segments of the row
constexpr int kSlots = kBins + kBins / 64;

// Bin b's slot in the histogram arrays: one pad per 64 bins, so that warp 0's lanes, each walking
// 64 consecutive bins, hit different banks.
__device__ __forceinline__ int slot(int b) { return b + (b >> 6); }

// Order-preserving unsigned keys (-0 counts as +0, as the comparisons do); 0 is below every key.
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

// e in 2^-32 fixed point: integer sums are exact, so the same in any order.
__device__ __forceinline__ unsigned long long fixed(double e) {
  return (unsigned long long)(e * 4294967296.0 + 0.5);
}

// ---- 16-byte loads ----------------------------------------------------------------------------
__device__ __forceinline__ void unpack(const bf16_t*, uint4 w, float* v) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(u[i] << 16);
    v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack(const f16_t*, uint4 w, float* v) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __half2float(__ushort_as_half((unsigned short)(u[i] & 0xffffu)));
    v[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(u[i] >> 16)));
  }
}
__device__ __forceinline__ void unpack(const float*, uint4 w, float* v) {
  v[0] = __uint_as_float(w.x), v[1] = __uint_as_float(w.y), v[2] = __uint_as_float(w.z), v[3] = __uint_as_float(w.w);
}
__device__ __forceinline__ void unpack(const double*, uint4 w, double* v) {
  v[0] = __longlong_as_double((long long)((uint64_t(w.y) << 32) | w.x));
  v[1] = __longlong_as_double((long long)((uint64_t(w.w) << 32) | w.z));
}

// Calls f(i, x[i]) for the elements of vectors j0, j0 + stride, ... < j1 (a vector = 16 bytes of the
// row, the last one maybe partial), in that order; 16-byte loads four deep where the row is aligned.
template <class T, class F>
__device__ __forceinline__ void for_each(const T* x, int64_t V, int64_t j0, int64_t j1, int stride, F&& f) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T);
  int64_t j = j0;
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int64_t full = min(j1, V / kVec);
    for (; j + 3 * stride < full; j += 4 * stride) {
      uint4 w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) w[u] = __ldg(xv + j + u * stride);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        A v[kVec];
        unpack(x, w[u], v);
#pragma unroll
        for (int t = 0; t < kVec; ++t) f((j + u * stride) * kVec + t, v[t]);
      }
    }
    for (; j < full; j += stride) {
      A v[kVec];
      unpack(x, __ldg(xv + j), v);
#pragma unroll
      for (int t = 0; t < kVec; ++t) f(j * kVec + t, v[t]);
    }
  }
  for (; j < j1; j += stride) {
#pragma unroll
    for (int t = 0; t < kVec; ++t)
      if (j * kVec + t < V) f(j * kVec + t, load(x + j * kVec + t));
  }
}

// A bin's mass in 2^-32 fixed point is (hi << 16) + lo, each half a 32-bit sum (shared-memory
// atomics on 64 bits are compare-and-swap loops): exact while the bin holds < 2^16 tokens.
template <class Key> union Pool {
  struct {
    unsigned int count[kSlots], hi[kSlots], lo[kSlots];
  } h;
  struct {  // the radix fallback's
    unsigned int count[256];
    unsigned long long mass[256];
  } r;
  Key keys[kPoolBytes / sizeof(Key)];
};
template <class Key> struct Shared {
  Pool<Key> pool;
  double dscratch[32];
  int64_t iscratch[32];
  double seg[kSegs];  // the draw's segment sums
  // warp 0's results, broadcast
  int g0, g1, ok;
  unsigned int ngather;
  int64_t above_count;
  unsigned long long above_mass, mtot;
  Key tau;
  int64_t token;
  // the radix fallback's walk
  uint64_t pick;
  double pick_above;
  unsigned long long pick_mass;
};

template <class Key> constexpr int kCap = kPoolBytes / int(sizeof(Key));  // gathered keys at most

// ---- histogram -> the bins to gather (warp 0) ---------------------------------------------------
// Lane l owns bins [64 l, 64 l + 64). Top-k: b_k = the first bin where the count from the top reaches
// k. Top-p: the boundary bin is the last non-empty bin whose mass above, M(b), is < target; with top-k,
// target >= t_lo = top_p * M(b_k) (the survivors weigh at least the bins above b_k), so the boundary
// lies in [b_lo, b_k] with b_lo that bin for t_lo. The gathered range [g0, g1] holds both.
template <class Key>
__device__ __forceinline__ void pick_bins(Shared<Key>& sh, int64_t k, double top_p, int cut) {
  constexpr int kPer = kBins / 32;
  const int lane = threadIdx.x & 31;
  const unsigned int* count = sh.pool.h.count;
  auto mass = [&](int b) { return (uint64_t(sh.pool.h.hi[slot(b)]) << 16) + sh.pool.h.lo[slot(b)]; };
  const bool topp = top_p < 1;
  unsigned long long c = 0, m = 0;
  bool crowded = false;  // a bin of >= 2^16 tokens: its halves may have wrapped
  for (int b = lane * kPer; b < (lane + 1) * kPer; ++b) {
    c += count[slot(b)], m += topp ? mass(b) : 0;
    crowded |= b < cut && count[slot(b)] >= 65536u;
  }
  crowded = __any_sync(0xffffffffu, crowded) && topp;
  unsigned long long c0 = c, m0 = m;  // exclusive scans over the lanes
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long uc = __shfl_up_sync(0xffffffffu, c0, o), um = __shfl_up_sync(0xffffffffu, m0, o);
    if (lane >= o) c0 += uc, m0 += um;
  }
  c0 -= c, m0 -= m;
  const unsigned long long mtot = sh.mtot;  // exact: the bins may leave out the negligible tail
  // top-k: b_k, the count above it and its M
  int bk = kBins - 1;
  unsigned long long bk_count = 0, bk_mass = 0;
  if (k > 0) {
    int mine = -1;
    unsigned long long cc = c0, mm = m0, at_c = 0, at_m = 0;
    if (c0 < (unsigned long long)k && (unsigned long long)k <= c0 + c) {
      for (int b = lane * kPer; b < (lane + 1) * kPer; ++b) {
        if (cc + count[slot(b)] >= (unsigned long long)k) {
          mine = b, at_c = cc, at_m = mm;
          break;
        }
        cc += count[slot(b)], mm += topp ? mass(b) : 0;
      }
    }
    const unsigned hit = __ballot_sync(0xffffffffu, mine >= 0);
    const int src = hit ? __ffs(hit) - 1 : 31;  // k < V: some lane holds it
    bk = max(0, __shfl_sync(0xffffffffu, mine, src));  // >= 0 as the counts add up to V > k
    bk_count = __shfl_sync(0xffffffffu, at_c, src);
    bk_mass = __shfl_sync(0xffffffffu, at_m, src);
  }
  // top-p: b_lo, its count and mass above
  int blo = -1;
  unsigned long long lo_count = 0, lo_mass = 0;
  if (topp) {
    const double t_lo = top_p * double(k > 0 ? bk_mass : mtot);
    int mine = -1;
    unsigned long long cc = c0, mm = m0, at_c = 0, at_m = 0;
    for (int b = lane * kPer; b < (lane + 1) * kPer && double(mm) < t_lo; ++b) {
      if (count[slot(b)] > 0) mine = b, at_c = cc, at_m = mm;
      cc += count[slot(b)], mm += mass(b);
    }
    const unsigned hit = __ballot_sync(0xffffffffu, mine >= 0);
    if (hit) {
      const int src = 31 - __clz(hit);  // the last bin that qualifies
      blo = __shfl_sync(0xffffffffu, mine, src);
      lo_count = __shfl_sync(0xffffffffu, at_c, src);
      lo_mass = __shfl_sync(0xffffffffu, at_m, src);
    }
  }
  int g0, g1;
  unsigned long long above_c, above_m, end_c;
  if (k > 0) {
    g1 = bk;
    end_c = bk_count + count[slot(bk)];
    if (!topp) g0 = bk, above_c = bk_count, above_m = 0;
    else if (blo >= 0) g0 = blo, above_c = lo_count, above_m = lo_mass;
    else g0 = 0, above_c = 0, above_m = 0;
  } else {  // top-p alone: the boundary bin itself (bin 0 always qualifies: M(0) = 0 < target)
    g0 = g1 = blo < 0 ? 0 : blo;
    above_c = lo_count, above_m = lo_mass;
    end_c = lo_count + count[slot(g1)];
  }
  if (lane == 0) {
    sh.g0 = g0, sh.g1 = g1;
    sh.ok = (blo >= 0 || !topp || k > 0) && !crowded ? int(end_c - above_c <= (unsigned long long)kCap<Key>) : 0;
    sh.above_count = int64_t(above_c), sh.above_mass = above_m;
  }
}

// Sorts keys[0, n) descending in shared memory (bitonic; zero pads up to a power of two).
template <class Key> __device__ __forceinline__ void sort_desc(Key* keys, int n) {
  int P = 1;
  while (P < n) P <<= 1;
  for (int i = n + int(threadIdx.x); i < P; i += kThreads) keys[i] = 0;
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < P / 2; i += kThreads) {
        const int a = 2 * i - (i & (stride - 1)), b = a + stride;
        const Key ka = keys[a], kb = keys[b];
        if ((ka < kb) == ((a & size) == 0)) keys[a] = kb, keys[b] = ka;
      }
      __syncthreads();
    }
  }
}

// The thresholds from the gathered keys, sorted (warp 0): top-k's vk is the r-th key, r = k - the
// count above the range; top-p walks the survivors (>= vk) best first, keeping each key while the
// mass strictly above it, C, is < top_p * Zk. Returns tau's key.
template <class Key, class E>
__device__ __forceinline__ Key thresholds(const Shared<Key>& sh, int n, int64_t k, double top_p, E e_of) {
  const int lane = threadIdx.x & 31;
  const Key* keys = sh.pool.keys;
  const Key vk = k > 0 ? keys[k - sh.above_count - 1] : Key(0);
  if (!(top_p < 1)) return vk;
  int nsurv = 0;  // keys >= vk: a prefix
  for (int i0 = 0; i0 < n; i0 += 32) nsurv += __popc(__ballot_sync(0xffffffffu, i0 + lane < n && keys[i0 + lane] >= vk));
  auto fix = [&](int i) { return i < nsurv ? fixed(double(e_of(val_of(keys[i])))) : 0ull; };
  unsigned long long zk = sh.mtot;
  if (k > 0) {
    unsigned long long s = 0;
    for (int i0 = 0; i0 < nsurv; i0 += 32) s += fix(i0 + lane);
    zk = sh.above_mass + warp_sum(s);
  }
  const double target = top_p * double(zk);
  unsigned long long C = sh.above_mass;
  int last = 0;
  for (int i0 = 0; i0 < nsurv; i0 += 32) {
    const unsigned long long f = fix(i0 + lane);
    unsigned long long incl = f;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    const unsigned keep = __ballot_sync(0xffffffffu, i0 + lane < nsurv && double(C + incl - f) < target);
    if (keep) last = i0 + 31 - __clz(keep);
    if (keep != 0xffffffffu) break;  // the mass above only grows
    C += __shfl_sync(0xffffffffu, incl, 31);
  }
  return keys[last];
}

// ---- radix select fallback -----------------------------------------------------------------------
// Radix walk for one digit: thread 0 picks a bin, all threads get it. Top-k: the bin holding the
// `remaining`-th largest. Top-p: the lowest non-empty bin whose mass above (strictly larger keys) is
// < target. Returns the bin; updates remaining / above.
template <class Key> __device__ __forceinline__ int walk_topk(Shared<Key>& sh, int64_t& remaining) {
  if (threadIdx.x == 0) {
    int64_t r = remaining;
    int b = 255;
    for (; b > 0; --b) {
      if (int64_t(sh.pool.r.count[b]) >= r) break;
      r -= sh.pool.r.count[b];
    }
    sh.pick = uint64_t(b);
    sh.pick_above = double(r);
  }
  __syncthreads();
  remaining = int64_t(sh.pick_above);
  return int(sh.pick);
}

template <class Key> __device__ __forceinline__ int walk_topp(Shared<Key>& sh, unsigned long long& above, double target) {
  if (threadIdx.x == 0) {
    unsigned long long a = above, chosen_above = above;
    int chosen = -1;
    for (int b = 255; b >= 0; --b) {
      if (sh.pool.r.count[b] == 0) continue;
      if (!(double(a) < target)) break;
      chosen = b;
      chosen_above = a;
      a += sh.pool.r.mass[b];
    }
    sh.pick = uint64_t(chosen < 0 ? 0 : chosen);  // chosen >= 0: the walk starts with above < target
    sh.pick_mass = chosen_above;
  }
  __syncthreads();
  above = sh.pick_mass;
  return int(sh.pick);
}

// tau by radix select over the whole row (8 bits a pass), for rows whose boundary bins are crowded.
template <class T, class Key, class E>
__device__ __forceinline__ acc_t<T> radix_threshold(Shared<Key>& sh, const T* x, int64_t V, int64_t k, double top_p, E e_of) {
  using A = acc_t<T>;
  constexpr int kBits = int(sizeof(Key)) * 8;
  unsigned int* count = sh.pool.r.count;
  unsigned long long* mass = sh.pool.r.mass;
  const int tid = threadIdx.x;
  A lo = A(-INFINITY);
  if (k > 0) {  // the k-th largest key, by counts (ties kept: x >= vk)
    Key prefix = 0, mask = 0;
    int64_t remaining = k;
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      __syncthreads();
      for (int b = tid; b < 256; b += kThreads) count[b] = 0;
      __syncthreads();
      for_each(x, V, tid, ceil_div(V, 16 / sizeof(T)), kThreads, [&](int64_t, A v) {
        const Key key = key_of(v);
        if ((key & mask) == prefix) atomicAdd(&count[(key >> shift) & 0xff], 1u);
      });
      __syncthreads();
      const int b = walk_topk(sh, remaining);
      prefix |= Key(b) << shift;
      mask |= Key(0xff) << shift;
    }
    lo = val_of(prefix);
  }
  if (top_p < 1) {  // the lowest survivor value whose mass above is < top_p * Zk
    const A vk = lo;
    Key prefix = 0, mask = 0;
    unsigned long long above = 0;
    double target = 0;
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      __syncthreads();
      for (int b = tid; b < 256; b += kThreads) count[b] = 0, mass[b] = 0;
      __syncthreads();
      for_each(x, V, tid, ceil_div(V, 16 / sizeof(T)), kThreads, [&](int64_t, A v) {
        const Key key = key_of(v);
        if (v >= vk && (key & mask) == prefix) {
          const int b = int((key >> shift) & 0xff);
          atomicAdd(&count[b], 1u);
          atomicAdd(&mass[b], fixed(double(e_of(v))));
        }
      });
      __syncthreads();
      if (shift == kBits - 8) {  // the first level sees every survivor: Zk in fixed point
        unsigned long long zk = 0;
        for (int b = 0; b < 256; ++b) zk += mass[b];
        target = top_p * double(zk);
      }
      const int b = walk_topp(sh, above, target);
      prefix |= Key(b) << shift;
      mask |= Key(0xff) << shift;
    }
    lo = val_of(prefix);
  }
  __syncthreads();  // the pool is free again
  return lo;
}

// ---- the draw -------------------------------------------------------------------------------------
// Inverse CDF over the allowed tokens in index order: segment s holds vectors [s S, (s + 1) S); the
// segment sums, added in order, tile [0, total) so exactly one segment holds u * total, and warp 0
// walks it 32 vectors at a time (a warp scan of the lanes' sums finds the vector, its lane the token).
// Rounding that leaves the target unreached gives the segment's (or the row's) last allowed token.
// One warp walks vectors [j0, j1) from the running sum `cum`, 32 vectors at a time: a warp scan of
// the lanes' sums finds the vector where the sum passes `target`, its lane the token. Rounding that
// leaves the target unreached gives the last allowed token. Out of line: it runs once per row.
template <class T, class F>
__device__ __noinline__ int64_t walk(const T* x, int64_t V, int64_t j0, int64_t j1, double cum, double target,
                                     F allowed) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  int64_t mine = -1;
  for (; j0 < j1; j0 += 32) {
    const int64_t j = j0 + lane;
    A v[kVec];
    if (j < j1 && aligned && j < V / kVec) {
      unpack(x, __ldg(reinterpret_cast<const uint4*>(x) + j), v);
    } else {
#pragma unroll
      for (int t = 0; t < kVec; ++t) v[t] = j < j1 && j * kVec + t < V ? load(x + j * kVec + t) : A(-INFINITY);
    }
    double sum = 0;
#pragma unroll
    for (int t = 0; t < kVec; ++t) {
      v[t] = allowed(v[t]);  // now the allowed e (0 for -inf padding)
      sum += double(v[t]);
      if (v[t] > 0) mine = j * kVec + t;
    }
    double incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
      const double up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    const double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    const unsigned hit = __ballot_sync(0xffffffffu, cum + incl > target);
    if (hit) {  // lane f has sum > 0: the lane before it stayed at or under the target
      const int f = __ffs(hit) - 1;
      double c = cum + (lane == 0 ? 0.0 : excl);
      int64_t tok = -1;
      bool done = false;
#pragma unroll
      for (int t = 0; t < kVec; ++t) {
        if (done || !(v[t] > 0)) continue;
        c += double(v[t]);
        tok = j * kVec + t;
        done = c > target;
      }
      return __shfl_sync(0xffffffffu, tok, f);
    }
    cum += __shfl_sync(0xffffffffu, incl, 31);
  }
  return warp_max(mine);
}

template <class T, class Key, class F>
__device__ __forceinline__ int64_t draw(Shared<Key>& sh, const T* x, int64_t V, double u, F allowed) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nvec = ceil_div(V, kVec), S = ceil_div(nvec, kSegs);
  int64_t last = -1;
  for (int s = warp; s < kSegs; s += kWarps) {
    double own = 0;
    for_each(x, V, s * S + lane, min(nvec, (s + 1) * S), 32, [&](int64_t i, A v) {
      const double e = double(allowed(v));
      own += e;
      if (e > 0) last = max(last, i);
    });
    own = warp_sum(own);
    if (lane == 0) sh.seg[s] = own;
  }
  last = block_reduce(last, int64_t(-1), Max(), sh.iscratch);  // ends with a barrier: seg is complete
  double run = 0, lo = 0;
  int at = -1;
#pragma unroll 1
  for (int s = 0; s < kSegs; ++s) run += sh.seg[s];
  const double target = u * run;
  run = 0;
#pragma unroll 1
  for (int s = 0; s < kSegs && at < 0; ++s) {
    const double hi = run + sh.seg[s];
    if (run <= target && target < hi) at = s, lo = run;
    run = hi;
  }
  if (at < 0) return last;  // u * total rounded up to total: the row's last allowed token (as the CPU)
  if (warp == 0) {
    const int64_t found = walk(x, V, at * S, min(nvec, (at + 1) * S), lo, target, allowed);
    if (lane == 0) sh.token = found;
  }
  __syncthreads();
  return sh.token;
}

template <class T>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(SampleParams p) {
  using A = acc_t<T>;
  using Key = typename KeyOf<A>::type;
  __shared__ Shared<Key> sh;
  const int64_t row = blockIdx.x, V = p.V;
  const T* x = static_cast<const T*>(p.logits) + row * V;  // (V,)
  const int tid = threadIdx.x;
  const int64_t nvec = ceil_div(V, 16 / sizeof(T));

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
  for_each(x, V, tid, nvec, kThreads, [&](int64_t, A v) {
    if (v != v) flags |= 1;
    else if (v == A(INFINITY)) flags |= 2;
    else m = max(m, v);
  });
  m = block_reduce(m, A(-INFINITY), Max(), reinterpret_cast<A*>(sh.dscratch));
  flags = block_reduce(flags, int64_t(0), [](int64_t a, int64_t b) { return a | b; }, sh.iscratch);
  if (flags & 1) return fail(kRowNaN);
  if (flags & 2) return fail(kRowPosInf);
  if (m == A(-INFINITY)) return fail(kRowAllNegInf);

  // 1 / T is capped so that a tiny temperature cannot make 0 * inf = NaN at the max.
  const double inv_t = temp > 0 ? min(1.0 / temp, DBL_MAX) : 1.0;
  const A c = A(min(inv_t * kLog2e, double(sizeof(A) == 4 ? FLT_MAX : DBL_MAX)));
  auto e_of = [&](A v) { return exp2((v - m) * c); };  // p / p_max, in (0, 1] for finite v
  // d = (max - x) log2(e) / T in 1/16 bit bins: monotone (non-increasing) in x
  auto bin_of = [&](A v) { return int(min((m - v) * c * A(kBinsPerBit), A(kBins - 1))); };
  const bool greedy = temp == 0;
  const int64_t k = !greedy && top_k < V ? top_k : 0;
  const bool topp = !greedy && top_p < 1, hist = k > 0 || topp;

  // Pass 2: Z = sum e over the row (the unfiltered softmax of the logprob), the first argmax for
  // greedy rows, and the histogram for top-k / top-p.
  // Top-p's boundary never lies among tokens of e < 2^(-cut / 16): they weigh < (1 - top_p) Zk / 4
  // (Zk >= 1: the max survives), so their bins skip the mass (and, without top-k, the count).
  int cut = kBins;
  if (topp && (1 - top_p) * 1073741824.0 >= double(V))  // V / 2 rounding halves weigh < (1 - top_p) / 8
    cut = int(min(double(kBins), ceil(16 * log2(8 * double(V) / (1 - top_p))) + 2));
  if (hist) {
    for (int b = tid; b < kSlots; b += kThreads) sh.pool.h.count[b] = 0, sh.pool.h.hi[b] = 0, sh.pool.h.lo[b] = 0;
    __syncthreads();
  }
  double z = 0;
  unsigned long long zfix = 0;  // Z in fixed point, exact
  int64_t first = INT64_MAX;
  for_each(x, V, tid, nvec, kThreads, [&](int64_t i, A v) {
    const A e = e_of(v);
    z += double(e);
    if (greedy && v == m) first = min(first, i);
    if (hist) {
      const int b = bin_of(v);
      if (b < cut || k > 0) atomicAdd(&sh.pool.h.count[slot(b)], 1u);
      if (topp) {
        const unsigned long long f = fixed(double(e));
        zfix += f;
        if (b < cut && f) {
          atomicAdd(&sh.pool.h.hi[slot(b)], unsigned(f >> 16));
          atomicAdd(&sh.pool.h.lo[slot(b)], unsigned(f & 0xffffu));
        }
      }
    }
  });
  z = block_reduce(z, 0.0, Sum(), sh.dscratch);  // its barriers also complete the histogram
  if (topp) {
    zfix = block_reduce(zfix, 0ull, Sum(), reinterpret_cast<unsigned long long*>(sh.iscratch));
    if (tid == 0) sh.mtot = zfix;
    __syncthreads();
  }

  int64_t token;
  if (greedy) {
    token = block_reduce(first, int64_t(INT64_MAX), Min(), sh.iscratch);
  } else {
    A lo = A(-INFINITY);
    if (hist) {
      if (tid < 32) pick_bins(sh, k, top_p, cut);
      __syncthreads();
      const int g0 = sh.g0, g1 = sh.g1;
      if (sh.ok) {  // gather the keys of bins [g0, g1] (the pool is free: pick_bins is done)
        if (tid == 0) sh.ngather = 0;
        __syncthreads();
        for_each(x, V, tid, nvec, kThreads, [&](int64_t, A v) {
          const int b = bin_of(v);
          if (b >= g0 && b <= g1) {
            const unsigned slot = atomicAdd(&sh.ngather, 1u);
            if (slot < unsigned(kCap<Key>)) sh.pool.keys[slot] = key_of(v);
          }
        });
        __syncthreads();
        const int n = int(sh.ngather);
        sort_desc(sh.pool.keys, n);
        if (tid < 32) {
          const Key tau = thresholds(sh, n, k, top_p, e_of);
          if (tid == 0) sh.tau = tau;
        }
        __syncthreads();
        lo = val_of(sh.tau);
      } else {
        lo = radix_threshold(sh, x, V, k, top_p, e_of);
      }
    }
    // min-p: the smallest A value thr with thr >= min_p, so that e >= thr <=> e >= min_p.
    A thr = A(min_p);
    if (double(thr) < min_p) thr = next_up(thr);
    auto allowed = [&](A v) -> A {  // e if the token is allowed, else 0
      if (!(v >= lo)) return A(0);
      const A e = e_of(v);
      return e >= thr ? e : A(0);
    };
    token = draw(sh, x, V, philox_uniform(p.seed, uint64_t(row), 0), allowed);
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
