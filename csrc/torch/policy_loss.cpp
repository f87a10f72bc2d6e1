// The torch adapter of policy_loss: the critic-free clipped surrogate (+ k3 KL, + entropy bonus), fused,
// with the per-token gradients of a unit upstream gradient. Its backward is ppo_loss_bwd (the same
// scaling of those gradients by grad_loss).
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "policy_loss/policy_loss.h"
#include "checks.h"

namespace fr::glue {
namespace {

void check_coef(double x, const char* name) {
  FR_CHECK(std::isfinite(x) && x >= 0.0, name, " must be finite and >= 0; got ", x);
}

// Checks the inputs and fills the kernel's view of them (contiguous copies are kept alive in `hold`).
// logprobs (B, T) sets the shape and dtype; advantages may be (B,) (one per sequence); mask is bool or
// weights of logprobs' dtype.
fr::PolicyLossInputs policy_inputs(std::vector<Tensor>& hold, const Tensor& logprobs, const Tensor& old_logprobs,
                                   const Tensor& advantages, const Tensor& mask,
                                   const std::optional<Tensor>& ref_logprobs, const std::optional<Tensor>& entropy,
                                   double eps_low, double eps_high, int64_t agg, double beta, int64_t max_len,
                                   double ent_coef) {
  const bool has_ref = ref_logprobs.has_value() && ref_logprobs->defined();
  const bool has_ent = entropy.has_value() && entropy->defined();
  check_cpu({{&logprobs, "logprobs"}, {&old_logprobs, "old_logprobs"}, {&advantages, "advantages"},
             {&mask, "mask"}});
  if (has_ref) check_cpu({{&logprobs, "logprobs"}, {&*ref_logprobs, "ref_logprobs"}});
  if (has_ent) check_cpu({{&logprobs, "logprobs"}, {&*entropy, "entropy"}});
  check_dim(logprobs, "logprobs", 2, "(B, T)");
  const fr::DType dtype = float_dtype(logprobs, "logprobs");
  std::vector<std::pair<const Tensor*, const char*>> same = {{&old_logprobs, "old_logprobs"}};
  if (has_ref) same.push_back({&*ref_logprobs, "ref_logprobs"});
  if (has_ent) same.push_back({&*entropy, "entropy"});
  for (auto [t, name] : same) check_same_shape(*t, name, logprobs, "logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const bool adv_per_seq = advantages.dim() == 1;
  FR_CHECK((adv_per_seq && advantages.size(0) == B) || (advantages.dim() == 2 && advantages.size(0) == B &&
                                                         advantages.size(1) == T),
           "advantages must be (B, T) = ", shape_of(logprobs), " or (B,) = (", B, ") (one per sequence); got ",
           shape_of(advantages));
  same.push_back({&advantages, "advantages"});
  for (auto [t, name] : same) {
    float_dtype(*t, name);
    check_same_dtype(*t, name, logprobs, "logprobs");
  }
  check_same_shape(mask, "mask", logprobs, "logprobs");
  const bool mask_is_bool = mask.scalar_type() == ScalarType::Bool;
  FR_CHECK(mask_is_bool || mask.scalar_type() == logprobs.scalar_type(),
           "mask must be bool or have the dtype of logprobs (", dtype_name(logprobs.scalar_type()), "); got ",
           dtype_name(mask.scalar_type()));
  check_coef(eps_low, "eps_low");
  check_coef(eps_high, "eps_high");
  check_coef(beta, "beta");
  check_coef(ent_coef, "ent_coef");
  FR_CHECK(agg >= 0 && agg <= 2, "agg must be 0 (token_mean), 1 (seq_mean_token_mean) or 2 "
           "(seq_mean_token_sum_norm); got ", agg);
  FR_CHECK(max_len >= 1, "max_len must be >= 1; got ", max_len);
  FR_CHECK(has_ref || beta == 0.0, "ref_logprobs is required when beta > 0; got beta=", beta,
           " and no ref_logprobs");
  auto ptr = [&hold](const Tensor& t) {
    hold.push_back(contig(t));
    return hold.back().const_data_ptr();
  };
  hold.reserve(6);
  return {dtype,
          ptr(logprobs),
          ptr(old_logprobs),
          ptr(advantages),
          has_ref ? ptr(*ref_logprobs) : nullptr,
          has_ent ? ptr(*entropy) : nullptr,
          ptr(mask),
          mask_is_bool,
          adv_per_seq,
          B,
          T,
          fr::PolicyAgg(agg),
          eps_low,
          eps_high,
          beta,
          double(max_len),
          ent_coef};
}

// loss (), stats (kNumPolicyStats,) and, when need_grads, grads (K, B, T) = d loss / d (logprobs[,
// entropy]) for a unit upstream gradient (K = 2 with entropy, else 1; (0,) otherwise), in the
// accumulation dtype: autograd's backward only scales them by grad_loss (ppo_loss_bwd).
std::tuple<Tensor, Tensor, Tensor> policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages,
                                                   Tensor mask, std::optional<Tensor> ref_logprobs,
                                                   std::optional<Tensor> entropy, double eps_low, double eps_high,
                                                   int64_t agg, double beta, int64_t max_len, double ent_coef,
                                                   bool need_grads) {
  std::vector<Tensor> hold;
  const fr::PolicyLossInputs in = policy_inputs(hold, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                                entropy, eps_low, eps_high, agg, beta, max_len, ent_coef);
  const ScalarType acc = acc_scalar_type(in.dtype);
  Tensor loss = torch::stable::new_empty(logprobs, {});
  Tensor stats = torch::stable::new_empty(logprobs, {int64_t(fr::kNumPolicyStats)}, acc);
  const int64_t K = entropy.has_value() && entropy->defined() ? 2 : 1;  // (in.entropy is null when B T = 0)
  Tensor grads = need_grads ? torch::stable::new_empty(logprobs, {K, in.B, in.T}, acc)
                            : torch::stable::new_empty(logprobs, {0}, acc);
  const fr::PolicyLossParams p{in, loss.mutable_data_ptr(), stats.mutable_data_ptr(),
                               need_grads ? grads.mutable_data_ptr() : nullptr};
  if (logprobs.is_cuda()) FR_CUDA_CALL(logprobs, fr::policy_loss_cuda(p, stream));
  else fr::policy_loss_cpu(p);
  return {loss, stats, grads};
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor? ref_logprobs, Tensor? entropy, float eps_low, float eps_high, int agg, float beta, int max_len, "
        "float ent_coef, bool need_grads) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("policy_loss_fwd", TORCH_BOX(&fr::glue::policy_loss_fwd));
}

#ifdef FR_WITH_CUDA
// The same function: it checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("policy_loss_fwd", TORCH_BOX(&fr::glue::policy_loss_fwd));
}
#endif
