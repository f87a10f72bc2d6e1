// The check vocabulary of the torch adapters (csrc/torch/<op>.cpp), the only code that touches torch
// tensors. It uses the torch stable C ABI alone (TORCH_TARGET_VERSION 2.10), so one build of fastrlhf
// loads in later torch releases. Each adapter checks its inputs (errors name the argument, the
// expectation and what came), allocates outputs, fills the kernel's params struct and calls the kernel.
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/runtime.h"

#ifdef FR_WITH_CUDA
// The CUDA part of torch's stable C shim (current stream) is declared under USE_CUDA, set by cmake.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#endif

// Errors read as plain sentences in Python (STD_TORCH_CHECK would prefix function, file and line).
#define FR_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) {                                            \
      std::ostringstream fr_msg_;                             \
      ::fr::glue::stream_all(fr_msg_, __VA_ARGS__);           \
      throw std::invalid_argument(fr_msg_.str());             \
    }                                                         \
  } while (0)

namespace fr::glue {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

template <class... Args>
void stream_all(std::ostringstream& s, const Args&... args) { (s << ... << args); }

std::string shape_of(const Tensor& t);                  // "(2, 3)"
std::string shape_str(const std::vector<int64_t>& shape);  // as shape_of
const char* dtype_name(ScalarType t);                   // "float32", as Python writes it

// The kernel dtype of a floating tensor; integer and other dtypes are refused by name.
fr::DType float_dtype(const Tensor& t, const char* name);
// The accumulation dtype the kernels use for statistics: float64 for float64, else float32.
ScalarType acc_scalar_type(fr::DType dtype);

void check_dtype(const Tensor& t, const char* name, ScalarType want);
void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name);
// All on one device: the CPU, or (in a build with CUDA kernels) one CUDA device.
void check_cpu(std::initializer_list<std::pair<const Tensor*, const char*>> ts);
void check_dim(const Tensor& t, const char* name, int64_t ndim, const char* layout);
void check_same_shape(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name);

Tensor contig(const Tensor& t);
Tensor to_cpu(const Tensor& t);

// FR_CUDA_CALL(t, call): runs `call` (which may use `stream`) on t's CUDA device with torch's current
// stream there. A CUDA tensor never falls back to the CPU: without CUDA kernels this is an error.
#ifdef FR_WITH_CUDA
template <class F>
void run_on_cuda(const Tensor& t, const F& f) {
  const int32_t dev = t.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev, &stream));
  f(static_cast<cudaStream_t>(stream));
}
#define FR_CUDA_CALL(t, ...) ::fr::glue::run_on_cuda(t, [&](cudaStream_t stream) { __VA_ARGS__; })
#else
#define FR_CUDA_CALL(t, ...) FR_CHECK(false, "this build of fastrlhf has no CUDA kernels")
#endif

}  // namespace fr::glue
