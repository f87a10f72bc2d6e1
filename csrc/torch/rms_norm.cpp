// The torch adapter of rms_norm: RMSNorm over the last dim, forward (y and each row's r) and backward.
#include <cmath>
#include <tuple>
#include <vector>

#include "rms_norm/rms_norm.h"
#include "checks.h"

namespace fr::glue {
namespace {

// x (..., C) and weight (C,) of x's dtype or float32; returns the weight's kernel dtype.
fr::DType check_x_weight(const Tensor& x, const Tensor& weight) {
  FR_CHECK(x.dim() >= 1, "x must be (..., C) with at least one dim; got shape ", shape_of(x));
  const int64_t C = x.size(x.dim() - 1);
  FR_CHECK(weight.dim() == 1 && weight.size(0) == C, "weight must be (C,) = (", C, ",); got ", shape_of(weight));
  FR_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == ScalarType::Float,
           "weight must have the dtype of x (", dtype_name(x.scalar_type()), ") or float32; got ",
           dtype_name(weight.scalar_type()));
  return float_dtype(weight, "weight");
}

std::vector<int64_t> leading(const Tensor& x) {  // x.shape[:-1]
  std::vector<int64_t> s;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) s.push_back(x.size(i));
  return s;
}

int64_t rows(const Tensor& x) {  // N = prod(x.shape[:-1]), also when C = 0
  int64_t n = 1;
  for (int64_t s : leading(x)) n *= s;
  return n;
}

std::tuple<Tensor, Tensor> rms_norm_fwd(Tensor x, Tensor weight, double eps) {
  check_cpu({{&x, "x"}, {&weight, "weight"}});
  const fr::DType dtype = float_dtype(x, "x");
  const fr::DType w_dtype = check_x_weight(x, weight);
  FR_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0; got ", eps);
  x = contig(x);
  weight = contig(weight);
  const int64_t C = x.size(x.dim() - 1);
  Tensor y = torch::stable::empty_like(x);
  Tensor rstd = torch::stable::new_empty(x, leading(x), acc_scalar_type(dtype));
  fr::RmsNormFwdParams p{dtype, w_dtype, x.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr(),
                         rstd.mutable_data_ptr(), rows(x), C, eps};
  if (x.is_cuda()) FR_CUDA_CALL(x, fr::rms_norm_fwd_cuda(p, stream));
  else fr::rms_norm_fwd_cpu(p);
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) {
  check_cpu({{&dy, "dy"}, {&x, "x"}, {&weight, "weight"}, {&rstd, "rstd"}});
  const fr::DType dtype = float_dtype(x, "x");
  const fr::DType w_dtype = check_x_weight(x, weight);
  check_same_dtype(dy, "dy", x, "x");
  check_same_shape(dy, "dy", x, "x");
  check_dtype(rstd, "rstd", acc_scalar_type(dtype));
  const int64_t C = x.size(x.dim() - 1), N = rows(x);
  FR_CHECK(rstd.numel() == N, "rstd must hold one value per row of x (", N, "); got shape ", shape_of(rstd));
  dy = contig(dy);
  x = contig(x);
  weight = contig(weight);
  rstd = contig(rstd);
  Tensor dx = torch::stable::empty_like(x);
  Tensor dw = torch::stable::new_empty(weight, {C});
  Tensor partial = torch::stable::new_empty(x, {fr::rms_norm_chunks(N), C}, acc_scalar_type(dtype));
  fr::RmsNormBwdParams p{dtype,
                         w_dtype,
                         dy.const_data_ptr(),
                         x.const_data_ptr(),
                         weight.const_data_ptr(),
                         rstd.const_data_ptr(),
                         dx.mutable_data_ptr(),
                         dw.mutable_data_ptr(),
                         partial.mutable_data_ptr(),
                         N,
                         C};
  if (x.is_cuda()) FR_CUDA_CALL(x, fr::rms_norm_bwd_cuda(p, stream));
  else fr::rms_norm_bwd_cpu(p);
  return {dx, dw};
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("rms_norm_fwd", TORCH_BOX(&fr::glue::rms_norm_fwd));
  m.impl("rms_norm_bwd", TORCH_BOX(&fr::glue::rms_norm_bwd));
}

#ifdef FR_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("rms_norm_fwd", TORCH_BOX(&fr::glue::rms_norm_fwd));
  m.impl("rms_norm_bwd", TORCH_BOX(&fr::glue::rms_norm_bwd));
}
#endif
