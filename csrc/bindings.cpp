// The only file that includes pybind11: the fastrlhf._C module. Loading it also
// registers the torch ops that the adapters in csrc/torch/ define (torch.ops.fastrlhf.*).
#include <pybind11/pybind11.h>

#include "common/runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrlhf compiled core: fused RLHF kernels registered as torch.ops.fastrlhf.*";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["compiler"] = FR_COMPILER;
        info["torch_version"] = FR_TORCH_VERSION;  // the torch this extension was compiled against
        info["stable_abi_target"] = "2.10";
        info["cpu_paths"] = py::make_tuple("base", "avx2");  // compiled in; picked at run time
        info["cpu_path"] = fr::cpu_path();                    // the one in use on this CPU
        info["native"] = bool(FR_NATIVE);
#ifdef FR_WITH_CUDA
        info["cuda"] = true;  // CUDA kernels compiled in (cmake/cuda.cmake)
#else
        info["cuda"] = false;
#endif
        return info;
      },
      "How this extension was built and which CPU code path it runs.");
}
