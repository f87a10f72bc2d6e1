// What kernels need from their host without knowing torch: a parallel-for over a
// thread pool, the pool's size, and which CPU code path to run. The torch adapter
// installs torch's parallel_for (so torch.set_num_threads applies); by default work
// runs serially on the calling thread.
#pragma once
#include <cstdint>
#include <utility>

// CUDA's stream handle, declared as CUDA's driver_types.h does so that each op's header can declare its
// CUDA launchers (csrc/<op>/*.cu) without any CUDA header. Every pointer in a params struct passed to a
// launcher is device memory unless its comment says host; each launcher enqueues its kernels on `stream`
// and throws std::runtime_error naming the kernel if a launch fails. They exist only in builds with CUDA.
typedef struct CUstream_st* cudaStream_t;

namespace fr {

using ParallelBody = void (*)(int64_t begin, int64_t end, void* ctx);
using ParallelForFn = void (*)(int64_t begin, int64_t end, int64_t grain, ParallelBody body, void* ctx);
using NumThreadsFn = int (*)();

void set_runtime(ParallelForFn parallel_for, NumThreadsFn num_threads);
void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, ParallelBody body, void* ctx);
int num_threads();

// f(begin, end) over [begin, end) in chunks of at least `grain` iterations.
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  auto body = [](int64_t b, int64_t e, void* ctx) { (*static_cast<const F*>(ctx))(b, e); };
  parallel_for_raw(begin, end, grain, body, const_cast<void*>(static_cast<const void*>(&f)));
}

// True when the CPU runs AVX2+FMA+F16C code (checked once).
bool cpu_has_avx2();
// The kernel code path in use: "avx2" or "base"; FASTRLHF_CPU_PATH=base forces the baseline.
const char* cpu_path();

}  // namespace fr

// Declares `fn` in both per-ISA namespaces and an fr::fn that dispatches at run time.
#define FR_DECLARE_CPU_KERNEL(fn, Params)                                   \
  namespace fr {                                                            \
  namespace base { void fn(const Params& p); }                              \
  namespace avx2 { void fn(const Params& p); }                              \
  inline void fn(const Params& p) {                                         \
    if (cpu_path()[0] == 'a') avx2::fn(p); else base::fn(p);                \
  }                                                                         \
  }
