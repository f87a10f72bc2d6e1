// The torch adapter of rows_linear: y = x @ w^T + b for a few rows of x (decode steps). CPU only.
#include <optional>

#include "linear/linear.h"
#include "checks.h"

namespace fr::glue {
namespace {

Tensor rows_linear(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  check_cpu({{&x, "x"}, {&weight, "weight"}});
  if (bias) check_cpu({{&x, "x"}, {&*bias, "bias"}});
  check_dim(x, "x", 2, "(N, K)");
  check_dim(weight, "weight", 2, "(M, K)");
  check_dtype(x, "x", ScalarType::Float);
  check_dtype(weight, "weight", ScalarType::Float);
  FR_CHECK(weight.size(1) == x.size(1), "weight must be (M, K) with K = x.size(1) = ", x.size(1), "; got shape ",
           shape_of(weight));
  if (bias) {
    check_dtype(*bias, "bias", ScalarType::Float);
    FR_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be (M,) with M = weight.size(0) = ",
             weight.size(0), "; got shape ", shape_of(*bias));
  }
  if (x.size(1) > 0 && x.stride(1) != 1) x = torch::stable::contiguous(x);  // rows may be strided, not columns
  weight = contig(weight);
  std::optional<Tensor> b = bias ? std::optional<Tensor>(contig(*bias)) : std::nullopt;
  Tensor y = torch::stable::new_empty(x, {x.size(0), weight.size(0)});
  fr::RowsLinearParams p{static_cast<const float*>(x.const_data_ptr()),
                         static_cast<const float*>(weight.const_data_ptr()),
                         b ? static_cast<const float*>(b->const_data_ptr()) : nullptr,
                         static_cast<float*>(y.mutable_data_ptr()),
                         x.size(0),
                         weight.size(0),
                         x.size(1),
                         x.size(0) > 1 ? x.stride(0) : x.size(1)};
  fr::rows_linear_cpu(p);
  return y;
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("rows_linear", TORCH_BOX(&fr::glue::rows_linear));
}
