// The only file that includes pybind11: the fastrlhf._C module. Loading it also
// registers the torch ops that the adapters in csrc/torch/ define (torch.ops.fastrlhf.*).
#include <pybind11/pybind11.h>

#include "common/runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrlhf compiled core: fused RLHF kernels registered as torch.ops.fastrlhf.*";
  fr::init_cpu_path_from_env();  // a FASTRLHF_CPU_PATH this CPU cannot run fails the import (ValueError)
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["compiler"] = FR_COMPILER;
        info["torch_version"] = FR_TORCH_VERSION;  // the torch this extension was compiled against
        info["stable_abi_target"] = "2.10";
        py::list compiled, offered;
        for (int i = 0; i < fr::kNumCpuPaths; ++i) {
          compiled.append(fr::cpu_path_name(fr::CpuPath(i)));
          if (fr::cpu_supports(fr::CpuPath(i))) offered.append(fr::cpu_path_name(fr::CpuPath(i)));
        }
        info["cpu_paths"] = py::tuple(compiled);            // compiled in; picked at run time
        info["cpu_paths_supported"] = py::tuple(offered);   // those this CPU runs
        info["cpu_path"] = fr::cpu_path_name(fr::cpu_path());  // the one in use
        // bf16 matrix instructions (torch's bf16 GEMMs use them; ~2.4x an fp32 GEMM where present)
        info["cpu_bf16"] = py::dict(py::arg("avx512_bf16") = bool(__builtin_cpu_supports("avx512bf16")),
                                    py::arg("amx_bf16") = bool(__builtin_cpu_supports("amx-bf16")));
        info["native"] = bool(FR_NATIVE);
#ifdef FR_WITH_CUDA
        info["cuda"] = true;  // CUDA kernels compiled in (cmake/cuda.cmake)
#else
        info["cuda"] = false;
#endif
        return info;
      },
      "How this extension was built, which CPU code paths this CPU offers and which one runs.");
  m.def(
      "set_cpu_path", [](const std::string& name) { fr::set_cpu_path(name.c_str()); }, py::arg("name"),
      "Run every later kernel call on CPU path `name` ('base', 'avx2' or 'avx512'; one this CPU supports), "
      "for tests and benchmarks that compare the paths in one process.");
}
