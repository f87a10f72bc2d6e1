// RMSNorm on the GPU, to the CPU kernel's contract (rms_norm.h). One warp per row (rows of a few
// thousand elements: a warp streams them at full bandwidth, and its shuffle sum has a fixed order). The
// backward's dw is summed without atomics, in the CPU kernel's chunks: a kernel sums each chunk of rows
// for a range of columns into `partial`, another adds the chunks pairwise in the CPU kernel's tree.
#include "common/cuda_utils.cuh"
#include "rms_norm/rms_norm.h"

namespace fr::cuda {
namespace {

constexpr int kWarps = 4;  // rows per block
constexpr int kColThreads = 128;

template <class T, class Wt>
__global__ void __launch_bounds__(kWarps * 32) fwd_kernel(const T* __restrict__ x,   // (N, C)
                                                           const Wt* __restrict__ w,  // (C,)
                                                           T* __restrict__ y,         // (N, C)
                                                           acc_t<T>* __restrict__ rstd,  // (N,)
                                                           int64_t N, int64_t C, double eps) {
  using acc = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  x += row * C, y += row * C;
  acc ss = 0;
  for (int64_t j = lane; j < C; j += 32) {
    const acc v = load(x + j);
    ss += v * v;
  }
  const acc r = acc(1) / sqrt(warp_sum(ss) / acc(C) + acc(eps));
  if (lane == 0) rstd[row] = r;
  for (int64_t j = lane; j < C; j += 32) store(y + j, acc(load(x + j)) * r * acc(load(w + j)));
}

template <class T, class Wt>
__global__ void __launch_bounds__(kWarps * 32) dx_kernel(const T* __restrict__ dy,  // (N, C)
                                                          const T* __restrict__ x,   // (N, C)
                                                          const Wt* __restrict__ w,  // (C,)
                                                          const acc_t<T>* __restrict__ rstd,  // (N,)
                                                          T* __restrict__ dx,        // (N, C)
                                                          int64_t N, int64_t C) {
  using acc = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  dy += row * C, x += row * C, dx += row * C;
  acc dot = 0;
  for (int64_t j = lane; j < C; j += 32) dot += acc(load(dy + j)) * acc(load(w + j)) * acc(load(x + j));
  const acc r = rstd[row];
  const acc k = r * r * r * warp_sum(dot) / acc(C);
  for (int64_t j = lane; j < C; j += 32)
    store(dx + j, acc(load(dy + j)) * acc(load(w + j)) * r - acc(load(x + j)) * k);
}

// partial[c, j] = sum over the rows of chunk c of dy x r, for column j (chunks striding over grid.y)
template <class T>
__global__ void __launch_bounds__(kColThreads) dw_chunk_kernel(const T* __restrict__ dy,  // (N, C)
                                                               const T* __restrict__ x,   // (N, C)
                                                               const acc_t<T>* __restrict__ rstd,  // (N,)
                                                               acc_t<T>* __restrict__ partial,  // (chunks, C)
                                                               int64_t N, int64_t C) {
  using acc = acc_t<T>;
  const int64_t j = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= C) return;
  for (int64_t c = blockIdx.y; c * kRmsNormChunk < N; c += gridDim.y) {
    const int64_t end = min(N, (c + 1) * kRmsNormChunk);
    acc s = 0;
    for (int64_t i = c * kRmsNormChunk; i < end; ++i)
      s += acc(load(dy + i * C + j)) * (acc(load(x + i * C + j)) * rstd[i]);
    partial[c * C + j] = s;
  }
}

// dw[j] = the chunks' sums of column j added pairwise in place, in the CPU kernel's tree
template <class Wt, class acc>
__global__ void __launch_bounds__(kColThreads) dw_sum_kernel(acc* __restrict__ partial,  // (chunks, C)
                                                             Wt* __restrict__ dw,  // (C,)
                                                             int64_t chunks, int64_t C) {
  const int64_t j = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= C) return;
  for (int64_t stride = 1; stride < chunks; stride *= 2)
    for (int64_t c = 0; c + stride < chunks; c += 2 * stride) partial[c * C + j] += partial[(c + stride) * C + j];
  store(dw + j, chunks ? partial[j] : acc(0));
}

template <class T, class Wt>
void fwd(const RmsNormFwdParams& p, cudaStream_t stream) {
  fwd_kernel<T, Wt><<<unsigned(ceil_div(p.N, kWarps)), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const Wt*>(p.w), static_cast<T*>(p.y),
      static_cast<acc_t<T>*>(p.rstd), p.N, p.C, p.eps);
}

template <class T, class Wt>
void bwd(const RmsNormBwdParams& p, cudaStream_t stream) {
  using acc = acc_t<T>;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const acc* rstd = static_cast<const acc*>(p.rstd);
  acc* partial = static_cast<acc*>(p.partial);
  const int64_t chunks = rms_norm_chunks(p.N);
  const unsigned col_blocks = unsigned(ceil_div(p.C, kColThreads));
  if (p.N > 0)
    dx_kernel<T, Wt><<<unsigned(ceil_div(p.N, kWarps)), kWarps * 32, 0, stream>>>(
        dy, x, static_cast<const Wt*>(p.w), rstd, static_cast<T*>(p.dx), p.N, p.C);
  if (chunks > 0)
    dw_chunk_kernel<T><<<dim3(col_blocks, unsigned(chunks < 65535 ? chunks : 65535)), kColThreads, 0, stream>>>(
        dy, x, rstd, partial, p.N, p.C);
  dw_sum_kernel<Wt, acc><<<col_blocks, kColThreads, 0, stream>>>(partial, static_cast<Wt*>(p.dw), chunks, p.C);
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

void rms_norm_fwd_cuda(const RmsNormFwdParams& p, cudaStream_t stream) {
  if (p.N == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    if (p.w_dtype == DType::f32) cuda::fwd<scalar_t, float>(p, stream);
    else cuda::fwd<scalar_t, scalar_t>(p, stream);
  });
  cuda::check_launch("rms_norm_fwd");
}

void rms_norm_bwd_cuda(const RmsNormBwdParams& p, cudaStream_t stream) {
  if (p.C == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    if (p.w_dtype == DType::f32) cuda::bwd<scalar_t, float>(p, stream);
    else cuda::bwd<scalar_t, scalar_t>(p, stream);
  });
  cuda::check_launch("rms_norm_bwd");
}

}  // namespace fr
