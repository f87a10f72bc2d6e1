// The check vocabulary (checks.h) and the host runtime the kernels use: torch's thread pool.
#include "checks.h"

namespace fr::glue {
namespace {

void torch_parallel_for(int64_t begin, int64_t end, int64_t grain, fr::ParallelBody body, void* ctx) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(b, e, ctx); });
}
int torch_num_threads() { return int(torch::stable::get_num_threads()); }
// Installed when _C loads, before any op can run (so torch.set_num_threads applies to the kernels).
const bool runtime_installed = (fr::set_runtime(torch_parallel_for, torch_num_threads), true);

}  // namespace

std::string shape_of(const Tensor& t) {
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < t.dim(); ++i) shape.push_back(t.size(i));
  return shape_str(shape);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ")";
  return s.str();
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Bool: return "bool";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    default: return "an unsupported dtype";
  }
}

fr::DType float_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return fr::DType::f32;
    case ScalarType::Double: return fr::DType::f64;
    case ScalarType::BFloat16: return fr::DType::bf16;
    case ScalarType::Half: return fr::DType::f16;
    default:
      FR_CHECK(false, name, " must be float32, float64, bfloat16 or float16; got ", dtype_name(t.scalar_type()));
  }
  return fr::DType::f32;
}

ScalarType acc_scalar_type(fr::DType dtype) {
  return dtype == fr::DType::f64 ? ScalarType::Double : ScalarType::Float;
}

void check_dtype(const Tensor& t, const char* name, ScalarType want) {
  FR_CHECK(t.scalar_type() == want, name, " must be ", dtype_name(want), "; got ", dtype_name(t.scalar_type()));
}

void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  FR_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
           dtype_name(ref.scalar_type()), "); got ", dtype_name(t.scalar_type()));
}

void check_cpu(std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
  const Tensor& first = *ts.begin()->first;
  for (auto [t, name] : ts) {
    FR_CHECK(t->get_device() == first.get_device() && t->is_cpu() == first.is_cpu(), name,
             " must be on the same device as ", ts.begin()->second, "; got ", t->is_cpu() ? "cpu" : "cuda", " vs ",
             first.is_cpu() ? "cpu" : "cuda");
#ifdef FR_WITH_CUDA
    FR_CHECK(t->is_cpu() || t->is_cuda(), name, " must be a CPU or CUDA tensor");
#else
    FR_CHECK(t->is_cpu(), name, " must be a CPU tensor (this build of fastrlhf has no CUDA kernels)");
#endif
  }
}

void check_dim(const Tensor& t, const char* name, int64_t ndim, const char* layout) {
  FR_CHECK(t.dim() == ndim, name, " must be ", layout, "; got shape ", shape_of(t));
}

void check_same_shape(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  bool same = t.dim() == ref.dim();
  for (int64_t i = 0; same && i < t.dim(); ++i) same = t.size(i) == ref.size(i);
  FR_CHECK(same, name, " must have the shape of ", ref_name, " ", shape_of(ref), "; got ", shape_of(t));
}

Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

Tensor to_cpu(const Tensor& t) {
  return t.is_cpu() ? t : torch::stable::to(t, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

}  // namespace fr::glue
