#include "common/runtime.h"

#include <cstdlib>
#include <cstring>

namespace fr {
namespace {
ParallelForFn g_parallel_for = nullptr;
NumThreadsFn g_num_threads = nullptr;
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

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

const char* cpu_path() {
  static const char* path = [] {
    const char* env = std::getenv("FASTRLHF_CPU_PATH");
    if (env && std::strcmp(env, "base") == 0) return "base";
    return cpu_has_avx2() ? "avx2" : "base";
  }();
  return path;
}

}  // namespace fr
