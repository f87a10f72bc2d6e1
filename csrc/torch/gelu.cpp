// The torch adapter of gelu: GELU (tanh approximation), forward and backward. CPU only.
#include "gelu/gelu.h"
#include "checks.h"

namespace fr::glue {
namespace {

// Any shape; the kernels see the flattened contiguous tensor. CPU only (Python sends CUDA to F.gelu).
Tensor gelu_fwd(Tensor x) {
  check_cpu({{&x, "x"}});
  const fr::DType dtype = float_dtype(x, "x");
  x = contig(x);
  Tensor y = torch::stable::empty_like(x);
  fr::gelu_tanh_fwd_cpu(fr::GeluFwdParams{dtype, x.const_data_ptr(), y.mutable_data_ptr(), x.numel()});
  return y;
}

Tensor gelu_bwd(Tensor x, Tensor dy) {
  check_cpu({{&x, "x"}, {&dy, "dy"}});
  const fr::DType dtype = float_dtype(x, "x");
  check_same_dtype(dy, "dy", x, "x");
  check_same_shape(dy, "dy", x, "x");
  x = contig(x);
  dy = contig(dy);
  Tensor dx = torch::stable::empty_like(x);
  fr::gelu_tanh_bwd_cpu(
      fr::GeluBwdParams{dtype, x.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(), x.numel()});
  return dx;
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor x, Tensor dy) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gelu_fwd", TORCH_BOX(&fr::glue::gelu_fwd));
  m.impl("gelu_bwd", TORCH_BOX(&fr::glue::gelu_bwd));
}
