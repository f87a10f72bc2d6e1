// Rotary embeddings on the GPU, to the CPU kernel's contract (rope.h): one block per token. Its first
// D/2 threads compute the token's cosines and sines in fp64 from the fp32 angle and round them to fp32
// (the CPU kernel's values, but for CUDA's sin/cos rounding near a tie) into shared memory; then the
// block rotates every pair of every head of q and k, consecutive threads on consecutive pairs.
#include "common/cuda_utils.cuh"
#include "rope/rope.h"

namespace fr::cuda {
namespace {

constexpr int kThreads = 128;

template <class T>
__device__ __forceinline__ void rotate_pair(const RopeTensor& r, int64_t b, int64_t t, int64_t h, int64_t i,
                                            int64_t half, float c, float s) {
  using acc = acc_t<T>;
  const T* x = static_cast<const T*>(r.x) + b * r.xs_b + t * r.xs_t + h * r.xs_h;
  T* y = static_cast<T*>(r.y) + b * r.ys_b + t * r.ys_t + h * r.ys_h;
  const acc x1 = load(x + i), x2 = load(x + half + i);
  store(y + i, x1 * acc(c) - x2 * acc(s));
  store(y + half + i, x2 * acc(c) + x1 * acc(s));
}

template <class T>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeParams p) {
  __shared__ float s_cos[kRopeMaxD / 2], s_sin[kRopeMaxD / 2];
  const int64_t tok = blockIdx.x, b = tok / p.T, t = tok % p.T, half = p.D / 2;
  const float pos = float(p.positions[b * p.pos_sb + t]);
  for (int64_t i = threadIdx.x; i < half; i += kThreads) {
    double s, c;
    sincos(double(pos * p.inv_freq[i]), &s, &c);  // the angle is an fp32 product, as HF's
    s_cos[i] = float(c);
    s_sin[i] = p.inverse ? -float(s) : float(s);
  }
  __syncthreads();
  const int64_t nq = p.q.H * half, n = (p.q.H + p.k.H) * half;
  for (int64_t w = threadIdx.x; w < n; w += kThreads) {
    const int64_t i = w % half;
    if (w < nq) rotate_pair<T>(p.q, b, t, w / half, i, half, s_cos[i], s_sin[i]);
    else rotate_pair<T>(p.k, b, t, (w - nq) / half, i, half, s_cos[i], s_sin[i]);
  }
}

}  // namespace
}  // namespace fr::cuda

namespace fr {

void rope_cuda(const RopeParams& p, cudaStream_t stream) {
  if (p.B * p.T == 0) return;
  FR_DISPATCH_FLOAT(p.dtype, {
    cuda::rope_kernel<scalar_t><<<unsigned(p.B * p.T), cuda::kThreads, 0, stream>>>(p);
  });
  cuda::check_launch("rope");
}

}  // namespace fr
