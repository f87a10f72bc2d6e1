// The torch adapter of gae: Generalized Advantage Estimation over (B, T) rewards and values.
#include <tuple>

#include "gae/gae.h"
#include "checks.h"

namespace fr::glue {
namespace {

std::tuple<Tensor, Tensor> gae(Tensor rewards, Tensor values, Tensor mask, double gamma, double lam) {
  check_cpu({{&rewards, "rewards"}, {&values, "values"}, {&mask, "mask"}});
  check_dim(rewards, "rewards", 2, "(B, T)");
  const fr::DType dtype = float_dtype(rewards, "rewards");
  check_same_dtype(values, "values", rewards, "rewards");
  check_same_shape(values, "values", rewards, "rewards");
  check_same_shape(mask, "mask", rewards, "rewards");
  check_dtype(mask, "mask", ScalarType::Bool);
  FR_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1]; got ", gamma);
  FR_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1]; got ", lam);
  rewards = contig(rewards);
  values = contig(values);
  mask = contig(mask);
  Tensor advantages = torch::stable::empty_like(rewards);
  Tensor returns = torch::stable::empty_like(rewards);
  fr::GaeParams p{dtype,
                  rewards.const_data_ptr(),
                  values.const_data_ptr(),
                  static_cast<const uint8_t*>(mask.const_data_ptr()),
                  advantages.mutable_data_ptr(),
                  returns.mutable_data_ptr(),
                  rewards.size(0),
                  rewards.size(1),
                  gamma,
                  lam};
  if (rewards.is_cuda()) FR_CUDA_CALL(rewards, fr::gae_cuda(p, stream));
  else fr::gae_cpu(p);
  return {advantages, returns};
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gae", TORCH_BOX(&fr::glue::gae));
}

#ifdef FR_WITH_CUDA
// The same functions: each checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("gae", TORCH_BOX(&fr::glue::gae));
}
#endif
