#include "common/runtime.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fr {
namespace {
ParallelForFn g_parallel_for = nullptr;
NumThreadsFn g_num_threads = nullptr;

const char* const kPathNames[kNumCpuPaths] = {"base", "avx2", "avx512"};

CpuPath best_supported() {
  for (int i = kNumCpuPaths - 1; i > 0; --i)
    if (cpu_supports(CpuPath(i))) return CpuPath(i);
  return CpuPath::base;
}

std::atomic<int> g_path{-1};  // -1: not chosen yet

// The path called `name`; throws when it is unknown or unsupported. `what` names the setting.
CpuPath parse_path(const char* name, const char* what) {
  std::string offered;
  for (int i = 0; i < kNumCpuPaths; ++i) {
    if (!cpu_supports(CpuPath(i))) continue;
    if (std::strcmp(name, kPathNames[i]) == 0) return CpuPath(i);
    offered += std::string(offered.empty() ? "" : ", ") + kPathNames[i];
  }
  throw std::invalid_argument(std::string(what) + " must be a CPU path this CPU supports (" + offered + "); got '" +
                              name + "'");
}
}  // namespace

void set_runtime(ParallelForFn parallel_for, NumThreadsFn num_threads) {
  g_parallel_for = parallel_for;
  g_num_threads = num_threads;
}

void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, ParallelBody body, void* ctx) {
  if (g_parallel_for) g_parallel_for(begin, end, grain, body, ctx);
  else body(begin, end, ctx);
}

int num_threads() { return g_num_threads ? g_num_threads() : 1; }

const char* cpu_path_name(CpuPath p) { return kPathNames[int(p)]; }

bool cpu_supports(CpuPath p) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  switch (p) {
    case CpuPath::base: return true;
    case CpuPath::avx2: return avx2;
    case CpuPath::avx512: return avx512;
  }
  return false;
}

CpuPath cpu_path() {
  const int p = g_path.load(std::memory_order_relaxed);
  if (p >= 0) return CpuPath(p);
  const CpuPath best = best_supported();  // the kernels were called before init_cpu_path_from_env
  g_path.store(int(best), std::memory_order_relaxed);
  return best;
}

void init_cpu_path_from_env() {
  const char* env = std::getenv("FASTRLHF_CPU_PATH");
  const CpuPath p = env && *env ? parse_path(env, "FASTRLHF_CPU_PATH") : best_supported();
  g_path.store(int(p), std::memory_order_relaxed);
}

void set_cpu_path(const char* name) { g_path.store(int(parse_path(name, "the CPU path")), std::memory_order_relaxed); }

}  // namespace fr
