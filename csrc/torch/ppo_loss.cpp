// The torch adapter of ppo_loss: PPO's clipped surrogate and value loss, fused, with its
// unit-gradient backward.
#include <optional>
#include <tuple>
#include <vector>

#include "ppo_loss/ppo_loss.h"
#include "checks.h"

namespace fr::glue {
namespace {

// Checks the (B, T) inputs and fills the kernel's view of them (contiguous copies are kept alive
// in `hold`). Tensors other than logprobs must have its shape and dtype; mask is bool or weights.
fr::PpoLossInputs ppo_inputs(std::vector<Tensor>& hold, const Tensor& logprobs, const Tensor& old_logprobs,
                             const Tensor& advantages, const Tensor& values, const Tensor& old_values,
                             const Tensor& returns, const Tensor& mask, const std::optional<Tensor>& entropy,
                             double clip_range, double clip_range_value, double vf_coef, double ent_coef) {
  const bool has_ent = entropy.has_value() && entropy->defined();
  check_cpu({{&logprobs, "logprobs"}, {&old_logprobs, "old_logprobs"}, {&advantages, "advantages"},
             {&values, "values"}, {&old_values, "old_values"}, {&returns, "returns"}, {&mask, "mask"}});
  if (has_ent) check_cpu({{&logprobs, "logprobs"}, {&*entropy, "entropy"}});
  check_dim(logprobs, "logprobs", 2, "(B, T)");
  const fr::DType dtype = float_dtype(logprobs, "logprobs");
  std::vector<std::pair<const Tensor*, const char*>> floats = {
      {&old_logprobs, "old_logprobs"}, {&advantages, "advantages"}, {&values, "values"},
      {&old_values, "old_values"}, {&returns, "returns"}};
  if (has_ent) floats.push_back({&*entropy, "entropy"});
  for (auto [t, name] : floats) {
    check_same_shape(*t, name, logprobs, "logprobs");
    float_dtype(*t, name);
    check_same_dtype(*t, name, logprobs, "logprobs");
  }
  check_same_shape(mask, "mask", logprobs, "logprobs");
  const bool mask_is_bool = mask.scalar_type() == ScalarType::Bool;
  FR_CHECK(mask_is_bool || mask.scalar_type() == logprobs.scalar_type(),
           "mask must be bool or have the dtype of logprobs (", dtype_name(logprobs.scalar_type()), "); got ",
           dtype_name(mask.scalar_type()));
  FR_CHECK(clip_range > 0.0, "clip_range must be > 0; got ", clip_range);
  FR_CHECK(clip_range_value > 0.0, "clip_range_value must be > 0; got ", clip_range_value);
  FR_CHECK(vf_coef >= 0.0, "vf_coef must be >= 0; got ", vf_coef);
  FR_CHECK(ent_coef >= 0.0, "ent_coef must be >= 0; got ", ent_coef);
  auto ptr = [&hold](const Tensor& t) {
    hold.push_back(contig(t));
    return hold.back().const_data_ptr();
  };
  hold.reserve(8);
  return {dtype,
          ptr(logprobs),
          ptr(old_logprobs),
          ptr(advantages),
          ptr(values),
          ptr(old_values),
          ptr(returns),
          has_ent ? ptr(*entropy) : nullptr,
          ptr(mask),
          mask_is_bool,
          logprobs.numel(),
          clip_range,
          clip_range_value,
          vf_coef,
          ent_coef};
}

// loss (), stats (kNumPpoStats,) and, when need_grads, grads (K, B, T) = d loss / d (logprobs,
// values[, entropy]) for a unit upstream gradient (K = 3 with entropy, else 2; (0,) otherwise), in
// the accumulation dtype: autograd's backward only scales them by grad_loss.
std::tuple<Tensor, Tensor, Tensor> ppo_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages,
                                                Tensor values, Tensor old_values, Tensor returns, Tensor mask,
                                                std::optional<Tensor> entropy, double clip_range,
                                                double clip_range_value, double vf_coef, double ent_coef,
                                                bool need_grads) {
  std::vector<Tensor> hold;
  const fr::PpoLossInputs in = ppo_inputs(hold, logprobs, old_logprobs, advantages, values, old_values, returns,
                                          mask, entropy, clip_range, clip_range_value, vf_coef, ent_coef);
  const ScalarType acc = acc_scalar_type(in.dtype);
  Tensor loss = torch::stable::new_empty(logprobs, {});
  Tensor stats = torch::stable::new_empty(logprobs, {int64_t(fr::kNumPpoStats)}, acc);
  // from the argument, not in.entropy: an empty (B, T) entropy has no data pointer (fuzzing found K = 2
  // for B * T = 0, and the backward then indexed a missing row)
  const int64_t K = entropy.has_value() && entropy->defined() ? 3 : 2;
  Tensor grads = need_grads ? torch::stable::new_empty(logprobs, {K, logprobs.size(0), logprobs.size(1)}, acc)
                            : torch::stable::new_empty(logprobs, {0}, acc);
  const fr::PpoLossParams p{in, loss.mutable_data_ptr(), stats.mutable_data_ptr(),
                            need_grads ? grads.mutable_data_ptr() : nullptr};
  if (logprobs.is_cuda()) FR_CUDA_CALL(logprobs, fr::ppo_loss_cuda(p, stream));
  else fr::ppo_loss_cpu(p);
  return {loss, stats, grads};
}

double scalar_value(const Tensor& t, const char* name) {
  FR_CHECK(t.numel() == 1, name, " must hold one value; got shape ", shape_of(t));
  const void* d = t.const_data_ptr();
  switch (float_dtype(t, name)) {
    case fr::DType::f32: return *static_cast<const float*>(d);
    case fr::DType::f64: return *static_cast<const double*>(d);
    case fr::DType::bf16: return fr::to_acc(*static_cast<const fr::bf16_t*>(d));
    case fr::DType::f16: return fr::to_acc(*static_cast<const fr::f16_t*>(d));
  }
  return 0.0;
}

// The backward: grads (K, B, T) from ppo_loss_fwd times grad_loss (), in grad_loss's dtype (the loss's).
// On CUDA the kernel reads grad_loss on the device (no sync).
Tensor ppo_loss_bwd(Tensor grads, Tensor grad_loss) {
  check_cpu({{&grads, "grads"}, {&grad_loss, "grad_loss"}});
  FR_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value; got shape ", shape_of(grad_loss));
  const fr::DType dtype = float_dtype(grad_loss, "grad_loss");
  check_dtype(grads, "grads", acc_scalar_type(dtype));
  const Tensor src = contig(grads);
  Tensor out = torch::stable::new_empty(grads, grads.sizes(), grad_loss.scalar_type());
  fr::PpoLossScaleParams p{dtype, src.const_data_ptr(), 0.0, out.mutable_data_ptr(), src.numel()};
  if (grads.is_cuda()) {
    const Tensor g = contig(grad_loss);
    FR_CUDA_CALL(grads, fr::ppo_loss_scale_cuda(p, g.const_data_ptr(), stream));
  } else {
    p.grad_loss = scalar_value(grad_loss, "grad_loss");
    fr::ppo_loss_scale_cpu(p);
  }
  return out;
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("ppo_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor values, Tensor old_values, "
        "Tensor returns, Tensor mask, Tensor? entropy, float clip_range, float clip_range_value, float vf_coef, "
        "float ent_coef, bool need_grads) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_loss_bwd(Tensor grads, Tensor grad_loss) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("ppo_loss_fwd", TORCH_BOX(&fr::glue::ppo_loss_fwd));
  m.impl("ppo_loss_bwd", TORCH_BOX(&fr::glue::ppo_loss_bwd));
}

#ifdef FR_WITH_CUDA
// The same functions: each checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("ppo_loss_fwd", TORCH_BOX(&fr::glue::ppo_loss_fwd));
  m.impl("ppo_loss_bwd", TORCH_BOX(&fr::glue::ppo_loss_bwd));
}
#endif
