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

// The CPU code paths compiled in (CMakeLists.txt), each for CPUs with more features than the one before:
// base (any x86-64), avx2 (AVX2 + FMA + F16C), avx512 (those + AVX-512 F/BW/VL). The kernels declared
// with FR_DECLARE_CPU_KERNEL have base and avx2 copies (avx512 runs the avx2 one); those declared with
// FR_DECLARE_CPU_KERNEL_AVX512 have all three.
enum class CpuPath : int { base = 0, avx2 = 1, avx512 = 2 };
constexpr int kNumCpuPaths = 3;
const char* cpu_path_name(CpuPath p);
// Whether this CPU (and its OS) runs the path's instructions (checked once).
bool cpu_supports(CpuPath p);
// The path in use: the best this CPU supports, unless FASTRLHF_CPU_PATH or set_cpu_path chose another.
CpuPath cpu_path();
// Reads FASTRLHF_CPU_PATH ("base", "avx2" or "avx512"; unset or empty: the best supported); throws
// std::invalid_argument naming the value when it is unknown or this CPU lacks the path. The extension
// calls it when it loads, so a bad value fails the import instead of a kernel.
void init_cpu_path_from_env();
// Switches every later kernel call to path `name` (tests run each path in one process); throws
// std::invalid_argument when the name is unknown or this CPU lacks the path.
void set_cpu_path(const char* name);

}  // namespace fr

// Declares `fn` in the base and avx2 namespaces and an fr::fn that dispatches at run time.
#define FR_DECLARE_CPU_KERNEL(fn, Params)                                   \
  namespace fr {                                                            \
  namespace base { void fn(const Params& p); }                              \
  namespace avx2 { void fn(const Params& p); }                              \
  inline void fn(const Params& p) {                                         \
    if (cpu_path() != CpuPath::base) avx2::fn(p); else base::fn(p);         \
  }                                                                         \
  }

// As FR_DECLARE_CPU_KERNEL, for kernels that also have an AVX-512 copy (FR_AVX512_SOURCES in CMake).
#define FR_DECLARE_CPU_KERNEL_AVX512(fn, Params)                            \
  namespace fr {                                                            \
  namespace base { void fn(const Params& p); }                              \
  namespace avx2 { void fn(const Params& p); }                              \
  namespace avx512 { void fn(const Params& p); }                            \
  inline void fn(const Params& p) {                                         \
    switch (cpu_path()) {                                                   \
      case CpuPath::avx512: avx512::fn(p); break;                           \
      case CpuPath::avx2: avx2::fn(p); break;                               \
      default: base::fn(p);                                                 \
    }                                                                       \
  }                                                                         \
  }
