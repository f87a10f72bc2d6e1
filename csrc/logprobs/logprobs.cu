// token_logprobs on the GPU, one block per row. With y = x / T and p = softmax(y):
//   logprob = y[target] - lse,  entropy = lse - E_p[y],  lse = log sum exp y,
//   d x_i = (g_lp * (1[i == target] - p_i) - g_H * p_i * (y_i - E_p[y])) / T.
// The forward reads the row once: each thread keeps an online-softmax state (Milakov & Gimelshein
// 2018, arXiv 1805.02867) relative to its running max logit M: with d = (x - M) * scale,
// s = sum e^d, t = sum e^d d (in log2 units for fp32, see Units), and the block merges the states in a
// fixed order. The backward reads the row once more and writes d logits once. Rows are read in 16-byte
// packs (a scalar head and tail around the aligned body).
// Range (as logprobs.cpp): everything is relative to the row's max logit M, subtracted before scaling;
// the saved statistics are M, log S and E_p[d] in float64 (logprobs.h). The old form, y = x * scale with
// a float lse, made +inf log-probs at |x| ~ 1e9 (lse off by its ulp) and overflowed near |x| = 2.4e38.
#include "logprobs/logprobs.h"
#include "common/cuda_utils.cuh"

namespace fr::cuda {
namespace {

constexpr int kThreads = 512;

template <class T>
struct Pack {
  static constexpr int n = 16 / int(sizeof(T));  // elements per 16-byte load
};

// The aligned body of a row: [head, head + packs * n) starts on a 16-byte boundary.
template <class T>
struct Split {
  int64_t head, packs, tail;  // tail = first element after the body
  __device__ Split(const T* x, int64_t V) {
    const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(x) & 15);
    head = mis == 0 ? 0 : (16 - mis) / int64_t(sizeof(T));
    if (head > V) head = V;
    packs = (V - head) / Pack<T>::n;
    tail = head + packs * Pack<T>::n;
  }
};

template <class T>
__device__ __forceinline__ void load_pack(const T* x, acc_t<T>* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(x);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<T>::n; ++k) out[k] = load(e + k);
}

// The forward works in units where exp is cheapest: log2 units for fp32 (exp2f is one instruction,
// expf several, and at 2 bytes a logit the fp32 forward was bound by instructions, not memory), natural
// units for fp64. Scores are y = x * (inv_t * kScale); results are converted back with kToNat.
template <class A>
struct Units;
template <>
struct Units<float> {
  static constexpr float kScale = 1.4426950408889634f, kToNat = 0.6931471805599453f;
  __device__ static float ex(float d) { return exp2f(d); }
  __device__ static float lg(float s) { return log2f(s); }
};
template <>
struct Units<double> {
  static constexpr double kScale = 1.0, kToNat = 1.0;
  __device__ static double ex(double d) { return exp(d); }
  __device__ static double lg(double s) { return log(s); }
};

// Online softmax state: m the max logit, and in those units (d = (x - m) * scale) s = sum e^d,
// t = sum e^d d; s == 0: empty.
template <class A>
struct State {
  A m, s, t;
};

template <class A>
__device__ __forceinline__ State<A> merge(State<A> a, State<A> b, A scale) {
  if (b.s == A(0)) return a;
  if (a.s == A(0)) return b;
  const A M = max(a.m, b.m), da = (a.m - M) * scale, db = (b.m - M) * scale;
  const A ea = Units<A>::ex(da), eb = Units<A>::ex(db);
  return {M, a.s * ea + b.s * eb, ea * (a.t + da * a.s) + eb * (b.t + db * b.s)};
}

// Adds n logits x[] (a pack or one element) to the state: one rescale per call, one exp per value.
template <class A, int n>
__device__ __forceinline__ void add(State<A>& st, const A* x, A scale) {
  A local = x[0];
#pragma unroll
  for (int k = 1; k < n; ++k) local = max(local, x[k]);
  if (local == -INFINITY) return;  // -inf logits carry no mass
  if (st.s == A(0)) {
    st = {local, A(0), A(0)};
  } else if (local > st.m) {
    const A dm = (st.m - local) * scale, r = Units<A>::ex(dm);
    st.t = r * (st.t + dm * st.s);
    st.s *= r;
    st.m = local;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) {
    // a -inf logit gives e = 0; clamping d keeps e * d = 0 (not 0 * inf = NaN) without a branch
    const A d = max((x[k] - st.m) * scale, A(-1e30)), e = Units<A>::ex(d);
    st.s += e;
    st.t += e * d;
  }
}

template <class T>
__device__ __forceinline__ const T* row_ptr(const T* logits, const RowLayout& L, int64_t n) {
  return logits + (n / L.inner) * L.stride_outer + (n % L.inner) * L.stride_inner;
}

template <class T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(TokenLogprobsFwdParams p, RowLayout L,
                                                       unsigned long long* bad_row) {
  using A = acc_t<T>;
  __shared__ State<A> s_state[kThreads / 32];
  const int64_t n = blockIdx.x;
  const T* x = row_ptr(static_cast<const T*>(p.logits), L, n);  // (V,)
  const A inv_t = A(p.inv_temperature), scale = inv_t * Units<A>::kScale;
  const Split<T> sp(x, p.V);
  State<A> st{A(-INFINITY), A(0), A(0)};
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) {
    const A xv = load(x + i);
    add<A, 1>(st, &xv, scale);
  }
  for (int64_t q = threadIdx.x; q < sp.packs; q += kThreads) {
    A xv[Pack<T>::n];
    load_pack(x + sp.head + q * Pack<T>::n, xv);
    add<A, Pack<T>::n>(st, xv, scale);
  }
  for (int64_t i = sp.tail + threadIdx.x; i < p.V; i += kThreads) {
    const A xv = load(x + i);
    add<A, 1>(st, &xv, scale);
  }
  // merge: warps by shuffles, then warp 0 over the warps' states, in a fixed order
  for (int o = 16; o > 0; o >>= 1) {
    const State<A> other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                         __shfl_xor_sync(0xffffffffu, st.t, o)};
    st = merge(st, other, scale);
  }
  if ((threadIdx.x & 31) == 0) s_state[threadIdx.x >> 5] = st;
  __syncthreads();
  if (threadIdx.x != 0) return;
  st = s_state[0];
  for (int w = 1; w < kThreads / 32; ++w) st = merge(st, s_state[w], scale);
  // A row of all -inf has s == 0: M = log S = -inf and NaN statistics, as log_softmax gives. Otherwise s >= 1
  // (the max contributes e^0), so log_s >= 0, tm <= 0: log-probs <= 0 and entropies >= 0 at any magnitude.
  const A to_nat = Units<A>::kToNat;
  const A log_s = Units<A>::lg(st.s) * to_nat, tm = st.s > A(0) ? st.t / st.s * to_nat : A(NAN);  // natural
  const int64_t target = p.targets[n];
  A lp = A(NAN);
  if (target >= 0 && target < p.V) lp = (load(x + target) - st.m) * inv_t - log_s;  // x - m: exact
  else atomicMin(bad_row, (unsigned long long)n);
  store(static_cast<T*>(p.logprobs) + n, lp);
  p.lse[2 * n] = double(st.m);
  p.lse[2 * n + 1] = double(log_s);
  if (p.entropy) {
    store(static_cast<T*>(p.entropy) + n, A(log_s - tm));
    p.mean_scaled[n] = double(tm);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(TokenLogprobsBwdParams p, RowLayout L) {
  using A = acc_t<T>;
  const int64_t n = blockIdx.x;
  const T* x = row_ptr(static_cast<const T*>(p.logits), L, n);  // (V,)
  T* dx = static_cast<T*>(p.d_logits) + n * p.V;                  // (V,)
  const A inv_t = A(p.inv_temperature);
  const A g_lp = p.grad_logprobs ? A(load(static_cast<const T*>(p.grad_logprobs) + n)) : A(0);
  const A g_h = p.grad_entropy ? A(load(static_cast<const T*>(p.grad_entropy) + n)) : A(0);
  // relative to the row's max logit M (logprobs.h): d = (x - M) / T, p = e^(d - log S)
  const A M = A(p.lse[2 * n]), log_s = A(p.lse[2 * n + 1]);
  const A mean_d = p.grad_entropy ? A(p.mean_scaled[n]) : A(0);
  int64_t target = p.targets[n];  // validated by the forward
  target = target < 0 ? 0 : target >= p.V ? p.V - 1 : target;
  auto grad = [&](A xv, int64_t i) {
    const A d = (xv - M) * inv_t, pr = exp(d - log_s);  // xv - M: exact for the logits with mass
    const A pd = pr > A(0) ? pr * (d - mean_d) : A(0);  // p (y - E_p[y])
    return A(-(g_lp * pr + g_h * pd) * inv_t + (i == target ? g_lp * inv_t : A(0)));
  };
  const Split<T> sp(x, p.V);
  // vector stores when d logits has the row's alignment (always, for contiguous logits)
  const bool same_align = (reinterpret_cast<uintptr_t>(dx) & 15) == (reinterpret_cast<uintptr_t>(x) & 15);
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) store(dx + i, grad(load(x + i), i));
  for (int64_t q = threadIdx.x; q < sp.packs; q += kThreads) {
    const int64_t i0 = sp.head + q * Pack<T>::n;
    A v[Pack<T>::n];
    load_pack(x + i0, v);
    if (same_align) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < Pack<T>::n; ++k) store(e + k, grad(v[k], i0 + k));
      *reinterpret_cast<uint4*>(dx + i0) = raw;
    } else {
#pragma unroll
      for (int k = 0; k < Pack<T>::n; ++k) store(dx + i0 + k, grad(v[k], i0 + k));
    }
  }
  for (int64_t i = sp.tail + threadIdx.x; i < p.V; i += kThreads) store(dx + i, grad(load(x + i), i));
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

int64_t token_logprobs_fwd_cuda(const TokenLogprobsFwdParams& p, const RowLayout& layout, int64_t* bad_row_dev,
                                int64_t* bad_target, cudaStream_t stream) {
  if (p.N == 0) return -1;
  auto* bad = reinterpret_cast<unsigned long long*>(bad_row_dev);
  cuda::check(cudaMemsetAsync(bad, 0xff, sizeof(*bad), stream), "token_logprobs_fwd: memset");  // no bad row
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::fwd_kernel<scalar_t><<<unsigned(p.N), cuda::kThreads, 0, stream>>>(p, layout, bad);
  });
  cuda::check_launch("token_logprobs_fwd");
  unsigned long long row = 0;
  cuda::check(cudaMemcpyAsync(&row, bad, sizeof(row), cudaMemcpyDeviceToHost, stream),
              "token_logprobs_fwd: copy back");
  if (row != ~0ull)  // the offending value, for the error message
    cuda::check(cudaMemcpyAsync(bad_target, p.targets + row, sizeof(int64_t), cudaMemcpyDeviceToHost, stream),
                "token_logprobs_fwd: copy back");
  cuda::check(cudaStreamSynchronize(stream), "token_logprobs_fwd: sync");
  return row == ~0ull ? -1 : int64_t(row);
}

void token_logprobs_bwd_cuda(const TokenLogprobsBwdParams& p, const RowLayout& layout, cudaStream_t stream) {
  if (p.N == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::bwd_kernel<scalar_t><<<unsigned(p.N), cuda::kThreads, 0, stream>>>(p, layout);
  });
  cuda::check_launch("token_logprobs_bwd");
}

}  // namespace fr
