// The only file that touches torch tensors. It uses the torch stable C ABI alone
// (TORCH_TARGET_VERSION 2.10), so one build of fastrlhf loads in later torch releases.
// Each op: check inputs (errors name the argument, the expectation and what came),
// allocate outputs, fill the kernel's params struct, call the kernel.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <vector>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "attention/attention.h"
#include "common/runtime.h"
#include "gae/gae.h"
#include "gelu/gelu.h"
#include "linear/linear.h"
#include "logprobs/logprobs.h"
#include "ppo_loss/ppo_loss.h"
#include "sample/sample.h"

#ifdef FR_WITH_CUDA
// The CUDA part of torch's stable C shim (current stream) is declared under USE_CUDA, set by cmake.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "common/cuda_ops.h"
#endif

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Errors read as plain sentences in Python (STD_TORCH_CHECK would prefix function, file and line).
#define FR_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) {                                            \
      std::ostringstream fr_msg_;                             \
      fr_stream_all(fr_msg_, __VA_ARGS__);                    \
      throw std::invalid_argument(fr_msg_.str());             \
    }                                                         \
  } while (0)

namespace {

template <class... Args>
void fr_stream_all(std::ostringstream& s, const Args&... args) { (s << ... << args); }

// ---- the host runtime the kernels use: torch's thread pool -------------------------------
void torch_parallel_for(int64_t begin, int64_t end, int64_t grain, fr::ParallelBody body, void* ctx) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(b, e, ctx); });
}
int torch_num_threads() { return int(torch::stable::get_num_threads()); }
const bool runtime_installed = (fr::set_runtime(torch_parallel_for, torch_num_threads), true);

// ---- checks ---------------------------------------------------------------------------------
std::string shape_of(const Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
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

// The kernel dtype of a floating tensor; integer and other dtypes are refused by name.
fr::DType float_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return fr::DType::f32;
    case ScalarType::Double: return fr::DType::f64;
    case ScalarType::BFloat16: return fr::DType::bf16;
    case ScalarType::Half: return fr::DType::f16;
    default:
      FR_CHECK(false, name, " must be float32, float64, bfloat16 or float16; got ",
                      dtype_name(t.scalar_type()));
  }
  return fr::DType::f32;
}

void check_dtype(const Tensor& t, const char* name, ScalarType want) {
  FR_CHECK(t.scalar_type() == want, name, " must be ", dtype_name(want), "; got ",
                  dtype_name(t.scalar_type()));
}

void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  FR_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                  dtype_name(ref.scalar_type()), "); got ", dtype_name(t.scalar_type()));
}

// All on one device: the CPU, or (in a build with CUDA kernels) one CUDA device.
void check_cpu(std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
  const Tensor& first = *ts.begin()->first;
  for (auto [t, name] : ts) {
    FR_CHECK(t->get_device() == first.get_device() && t->is_cpu() == first.is_cpu(), name,
                    " must be on the same device as ", ts.begin()->second, "; got ",
                    t->is_cpu() ? "cpu" : "cuda", " vs ", first.is_cpu() ? "cpu" : "cuda");
#ifdef FR_WITH_CUDA
    FR_CHECK(t->is_cpu() || t->is_cuda(), name, " must be a CPU or CUDA tensor");
#else
    FR_CHECK(t->is_cpu(), name, " must be a CPU tensor (this build of fastrlhf has no CUDA kernels)");
#endif
  }
}

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
#define FR_CUDA_CALL(t, ...) run_on_cuda(t, [&](cudaStream_t stream) { __VA_ARGS__; })
#else
#define FR_CUDA_CALL(t, ...) FR_CHECK(false, "this build of fastrlhf has no CUDA kernels")
#endif

Tensor to_cpu(const Tensor& t) {
  return t.is_cpu() ? t : torch::stable::to(t, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

void check_dim(const Tensor& t, const char* name, int64_t ndim, const char* layout) {
  FR_CHECK(t.dim() == ndim, name, " must be ", layout, "; got shape ", shape_of(t));
}

void check_same_shape(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  bool same = t.dim() == ref.dim();
  for (int64_t i = 0; same && i < t.dim(); ++i) same = t.size(i) == ref.size(i);
  FR_CHECK(same, name, " must have the shape of ", ref_name, " ", shape_of(ref), "; got ",
                  shape_of(t));
}

Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// ---- gae ------------------------------------------------------------------------------------
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

// ---- token_logprobs ---------------------------------------------------------------------------
std::vector<int64_t> leading_shape(const Tensor& t) {  // t.shape[:-1]
  std::vector<int64_t> s;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) s.push_back(t.size(i));
  return s;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ")";  // as shape_of
  return s.str();
}

// Element offset of each (V,) row of logits (..., V) whose last dim has stride 1: leading dims may
// be strided (e.g. logits[:, :-1]), so such views are read in place instead of copied.
std::vector<int64_t> row_offsets(const Tensor& logits) {
  const std::vector<int64_t> lead = leading_shape(logits);
  int64_t N = 1;
  for (int64_t s : lead) N *= s;
  std::vector<int64_t> offsets(size_t(N > 0 ? N : 0));
  std::vector<int64_t> idx(lead.size(), 0);
  int64_t off = 0;
  for (int64_t n = 0; n < N; ++n) {
    offsets[size_t(n)] = off;
    for (int64_t d = int64_t(lead.size()) - 1; d >= 0; --d) {  // odometer over the leading dims
      off += logits.stride(d);
      if (++idx[size_t(d)] < lead[size_t(d)]) break;
      off -= logits.stride(d) * lead[size_t(d)];
      idx[size_t(d)] = 0;
    }
  }
  return offsets;
}

ScalarType acc_scalar_type(fr::DType dtype) {
  return dtype == fr::DType::f64 ? ScalarType::Double : ScalarType::Float;
}

fr::DType check_logits(const Tensor& logits) {
  FR_CHECK(logits.dim() >= 1, "logits must be (..., V); got shape ", shape_of(logits));
  const fr::DType dtype = float_dtype(logits, "logits");
  FR_CHECK(logits.size(logits.dim() - 1) >= 1, "logits must have V >= 1 classes in its last dim; got shape ",
           shape_of(logits));
  return dtype;
}

void check_lead_shape(const Tensor& t, const char* name, const Tensor& logits) {
  const std::vector<int64_t> lead = leading_shape(logits);
  bool same = t.dim() == int64_t(lead.size());
  for (int64_t i = 0; same && i < t.dim(); ++i) same = t.size(i) == lead[size_t(i)];
  FR_CHECK(same, name, " must have the shape of logits.shape[:-1] ", shape_str(lead), "; got ", shape_of(t));
}

// Logits are read in place when their last dim has stride 1.
Tensor rows_readable(const Tensor& logits) {
  return logits.stride(logits.dim() - 1) == 1 ? logits : torch::stable::contiguous(logits);
}

#ifdef FR_WITH_CUDA
// The CUDA kernels address rows by at most two leading dims: adjacent dims whose strides nest are merged
// (logits[:, :-1] of a contiguous (B, T, V) is two groups); more groups are made contiguous first.
fr::RowLayout cuda_rows(Tensor& logits) {
  int64_t size[2] = {1, 1}, stride[2] = {0, 0};  // [0] inner group, [1] outer group
  int groups = 0;
  for (int64_t d = logits.dim() - 2; d >= 0; --d) {
    const int64_t n = logits.size(d), st = logits.stride(d);
    if (n == 1) continue;  // its stride never matters
    if (groups > 0 && st == stride[groups - 1] * size[groups - 1]) {
      size[groups - 1] *= n;
    } else if (groups < 2) {
      size[groups] = n, stride[groups] = st, ++groups;
    } else {  // a third group: copy
      logits = torch::stable::contiguous(logits);
      const int64_t V = logits.size(logits.dim() - 1);  // >= 1, checked
      return {std::max<int64_t>(1, logits.numel() / V), 0, V};
    }
  }
  return {size[0], stride[1], stride[0]};
}
#endif

std::tuple<Tensor, Tensor, Tensor, Tensor> token_logprobs_fwd(Tensor logits, Tensor targets, double temperature,
                                                              bool return_entropy) {
  check_cpu({{&logits, "logits"}, {&targets, "targets"}});
  const fr::DType dtype = check_logits(logits);
  check_dtype(targets, "targets", ScalarType::Long);
  check_lead_shape(targets, "targets", logits);
  FR_CHECK(temperature > 0.0, "temperature must be > 0; got ", temperature);
  logits = rows_readable(logits);
  targets = contig(targets);
  const std::vector<int64_t> lead = leading_shape(logits);
  const std::vector<int64_t> offsets = logits.is_cuda() ? std::vector<int64_t>() : row_offsets(logits);
  int64_t N = 1;
  for (int64_t s : lead) N *= s;
  const std::vector<int64_t> ent_shape = return_entropy ? lead : std::vector<int64_t>{0};
  const ScalarType acc = acc_scalar_type(dtype);
  Tensor logprobs = torch::stable::new_empty(logits, lead);
  Tensor entropy = torch::stable::new_empty(logits, ent_shape);
  Tensor lse = torch::stable::new_empty(logits, lead, acc);
  Tensor mean_scaled = torch::stable::new_empty(logits, ent_shape, acc);
  const int64_t V = logits.size(logits.dim() - 1);
  int64_t bad_row = -1, bad_target = 0;
  fr::TokenLogprobsFwdParams p{dtype,
                               logits.const_data_ptr(),
                               offsets.data(),
                               static_cast<const int64_t*>(targets.const_data_ptr()),
                               logprobs.mutable_data_ptr(),
                               return_entropy ? entropy.mutable_data_ptr() : nullptr,
                               lse.mutable_data_ptr(),
                               return_entropy ? mean_scaled.mutable_data_ptr() : nullptr,
                               N,
                               V,
                               1.0 / temperature,
                               &bad_row};
  if (logits.is_cuda()) {
    FR_CUDA_CALL(logits, {
      const fr::RowLayout layout = cuda_rows(logits);
      p.logits = logits.const_data_ptr();  // cuda_rows may have made a contiguous copy
      Tensor scratch = torch::stable::new_empty(logits, {1}, ScalarType::Long);
      bad_row = fr::token_logprobs_fwd_cuda(p, layout, static_cast<int64_t*>(scratch.mutable_data_ptr()),
                                            &bad_target, stream);
    });
  } else {
    fr::token_logprobs_fwd_cpu(p);
    if (bad_row >= 0) bad_target = static_cast<const int64_t*>(targets.const_data_ptr())[bad_row];
  }
  if (bad_row >= 0) {  // name the value and its position in targets
    std::vector<int64_t> pos(lead.size());
    for (int64_t d = int64_t(lead.size()) - 1, r = bad_row; d >= 0; --d) {
      pos[size_t(d)] = r % lead[size_t(d)];
      r /= lead[size_t(d)];
    }
    FR_CHECK(false, "targets must be in [0, V) = [0, ", V, "); got ", bad_target, " at position ", shape_str(pos));
  }
  return {logprobs, entropy, lse, mean_scaled};
}

Tensor token_logprobs_bwd(std::optional<Tensor> grad_logprobs, std::optional<Tensor> grad_entropy, Tensor logits,
                          Tensor targets, Tensor lse, Tensor mean_scaled, double temperature) {
  check_cpu({{&logits, "logits"}, {&targets, "targets"}, {&lse, "lse"}, {&mean_scaled, "mean_scaled"}});
  const fr::DType dtype = check_logits(logits);
  check_dtype(targets, "targets", ScalarType::Long);
  check_lead_shape(targets, "targets", logits);
  check_lead_shape(lse, "lse", logits);
  check_dtype(lse, "lse", acc_scalar_type(dtype));
  FR_CHECK(temperature > 0.0, "temperature must be > 0; got ", temperature);
  for (auto* g : {&grad_logprobs, &grad_entropy}) {
    if (!g->has_value() || !(*g)->defined()) {
      g->reset();
      continue;
    }
    const char* name = g == &grad_logprobs ? "grad_logprobs" : "grad_entropy";
    check_cpu({{&logits, "logits"}, {&**g, name}});
    check_same_dtype(**g, name, logits, "logits");
    check_lead_shape(**g, name, logits);
    **g = contig(**g);
  }
  if (grad_entropy) {
    check_lead_shape(mean_scaled, "mean_scaled", logits);
    check_dtype(mean_scaled, "mean_scaled", acc_scalar_type(dtype));
  }
  logits = rows_readable(logits);
  targets = contig(targets);
  lse = contig(lse);
  mean_scaled = contig(mean_scaled);
  const std::vector<int64_t> offsets = logits.is_cuda() ? std::vector<int64_t>() : row_offsets(logits);
  Tensor d_logits = torch::stable::new_empty(logits, logits.sizes());
  if (logits.is_cpu())
    fr::advise_huge_pages(d_logits.mutable_data_ptr(), size_t(d_logits.numel()) * d_logits.element_size());
  fr::TokenLogprobsBwdParams p{dtype,
                               logits.const_data_ptr(),
                               offsets.data(),
                               static_cast<const int64_t*>(targets.const_data_ptr()),
                               lse.const_data_ptr(),
                               grad_entropy ? mean_scaled.const_data_ptr() : nullptr,
                               grad_logprobs ? grad_logprobs->const_data_ptr() : nullptr,
                               grad_entropy ? grad_entropy->const_data_ptr() : nullptr,
                               d_logits.mutable_data_ptr(),
                               d_logits.numel() / std::max<int64_t>(1, logits.size(logits.dim() - 1)),
                               logits.size(logits.dim() - 1),
                               1.0 / temperature};
  if (logits.is_cuda()) {
    FR_CUDA_CALL(logits, {
      const fr::RowLayout layout = cuda_rows(logits);
      p.logits = logits.const_data_ptr();
      fr::token_logprobs_bwd_cuda(p, layout, stream);
    });
  } else {
    fr::token_logprobs_bwd_cpu(p);
  }
  return d_logits;
}

// logits (N, V) contiguous CPU float is overwritten with scale * d log p[target] / d logits; returns
// log p[target] (N,). The fused LM-head loss calls it on each chunk of rows between its GEMMs.
Tensor token_logprobs_grad_(Tensor logits, Tensor targets, double scale) {
  check_cpu({{&logits, "logits"}, {&targets, "targets"}});
  FR_CHECK(logits.is_cpu(), "token_logprobs_grad_ runs on the CPU only; got a CUDA tensor");
  check_dim(logits, "logits", 2, "(N, V)");
  const fr::DType dtype = check_logits(logits);
  FR_CHECK(logits.is_contiguous(), "logits must be contiguous (it is overwritten in place)");
  check_dtype(targets, "targets", ScalarType::Long);
  check_lead_shape(targets, "targets", logits);
  targets = contig(targets);
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* t = static_cast<const int64_t*>(targets.const_data_ptr());
  for (int64_t n = 0; n < N; ++n)  // checked before any row is overwritten
    FR_CHECK(t[n] >= 0 && t[n] < V, "targets must be in [0, V) = [0, ", V, "); got ", t[n], " at position (", n,
             ")");
  Tensor logprobs = torch::stable::new_empty(logits, {N});
  fr::TokenLogprobsGradParams p{dtype, logits.mutable_data_ptr(), t, logprobs.mutable_data_ptr(), N, V, scale};
  fr::token_logprobs_grad_cpu(p);
  return logprobs;
}

// ---- ppo_loss ---------------------------------------------------------------------------------
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
  const int64_t K = in.entropy ? 3 : 2;
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

// ---- causal_attention -----------------------------------------------------------------------
struct AttnShape {
  int64_t B, H, Hkv, Tq, Tk, D;
};

bool is_integer(ScalarType t) {
  return t == ScalarType::Byte || t == ScalarType::Char || t == ScalarType::Short || t == ScalarType::Int ||
         t == ScalarType::Long;
}

// Checks q, k, v and segment_ids; returns the sizes and segment_ids as contiguous int64 (or empty).
AttnShape check_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          std::optional<Tensor>& segment_ids) {
  check_dim(q, "q", 4, "(B, H, Tq, D)");
  check_dim(k, "k", 4, "(B, Hkv, Tk, D)");
  check_dim(v, "v", 4, "(B, Hkv, Tk, D)");
  float_dtype(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  const AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  FR_CHECK(s.D >= 1 && s.D <= 256, "q must be (B, H, Tq, D) with 1 <= D <= 256; got ", shape_of(q));
  FR_CHECK(k.size(0) == s.B && k.size(3) == s.D, "k must be (B, Hkv, Tk, D) with the B and D of q (", s.B,
           ", ", s.D, "); got ", shape_of(k));
  check_same_shape(v, "v", k, "k");
  FR_CHECK(s.Tq <= s.Tk, "q must have no more positions than k (Tq <= Tk); got Tq = ", s.Tq, ", Tk = ", s.Tk);
  FR_CHECK(s.Hkv >= 1 && s.H % s.Hkv == 0,
           "the heads of q must be a multiple of the heads of k (H % Hkv == 0); got H = ", s.H,
           ", Hkv = ", s.Hkv);
  if (segment_ids) {
    const Tensor& seg = *segment_ids;
    FR_CHECK(seg.dim() == 2 && seg.size(0) == s.B && seg.size(1) == s.Tk, "segment_ids must be (B, Tk) = (",
             s.B, ", ", s.Tk, "); got shape ", shape_of(seg));
    FR_CHECK(is_integer(seg.scalar_type()), "segment_ids must have an integer dtype; got ",
             dtype_name(seg.scalar_type()));
    segment_ids =
        contig(seg.scalar_type() == ScalarType::Long ? seg : torch::stable::to(seg, ScalarType::Long));
  }
  return s;
}

// What the CUDA kernels add: no float64, and B, H within the grid's y/z limits.
void check_attention_cuda(const Tensor& q, const AttnShape& s) {
  FR_CHECK(q.scalar_type() != ScalarType::Double, "q must be float32, bfloat16 or float16 on CUDA; got float64");
  FR_CHECK(s.B < 65536 && s.H < 65536, "q must be (B, H, Tq, D) with B, H < 65536 on CUDA; got ", shape_of(q));
}

// The stride P of k's and v's (b, h) planes when both are (B, Hkv, Tk, D) with rows of D contiguous
// elements, D apart, and planes P apart (P >= Tk * D); 0 when they need a contiguous copy.
int64_t kv_plane(const Tensor& k, const Tensor& v, const AttnShape& s) {
  const int64_t P = k.stride(1);
  for (const Tensor* t : {&k, &v}) {
    if ((s.D > 1 && t->stride(3) != 1) || (s.Tk > 1 && t->stride(2) != s.D) || (s.Hkv > 1 && t->stride(1) != P) ||
        (s.B > 1 && t->stride(0) != s.Hkv * P))
      return 0;
  }
  return P >= s.Tk * s.D ? P : 0;
}

#ifdef FR_WITH_CUDA
constexpr int64_t kCudaDecodeTq = fr::kAttnDecodeTq;  // below it the CUDA forward honours kv_plane
#else
constexpr int64_t kCudaDecodeTq = 0;
#endif

const int64_t* seg_ptr(const std::optional<Tensor>& seg) {
  return seg ? static_cast<const int64_t*>(seg->const_data_ptr()) : nullptr;
}

std::tuple<Tensor, Tensor> causal_attention_fwd(Tensor q, Tensor k, Tensor v, double scale,
                                                std::optional<Tensor> segment_ids) {
  check_cpu({{&q, "q"}, {&k, "k"}, {&v, "v"}});
  if (segment_ids) check_cpu({{&q, "q"}, {&*segment_ids, "segment_ids"}});
  const AttnShape s = check_attention(q, k, v, segment_ids);
  const fr::DType dtype = float_dtype(q, "q");
  if (q.is_cuda()) check_attention_cuda(q, s);
  q = contig(q);
  // A KV-cache view k[:, :, :Tk] of a (B, Hkv, max_len, D) buffer is read in place (no per-step copy) on
  // the CPU and by the CUDA decode kernel (Tq < 16); the other CUDA kernels read contiguous k, v.
  const int64_t plane = q.is_cuda() && s.Tq >= kCudaDecodeTq ? 0 : kv_plane(k, v, s);
  if (plane == 0) {
    k = contig(k);
    v = contig(v);
  }
  Tensor out = torch::stable::empty_like(q);
  // lse in fp64 for every dtype: the backward recomputes P from it (see attention.cpp)
  Tensor lse = torch::stable::new_empty(q, {s.B, s.H, s.Tq}, ScalarType::Double);
  fr::AttnFwdParams p{dtype,
                      q.const_data_ptr(),
                      k.const_data_ptr(),
                      v.const_data_ptr(),
                      seg_ptr(segment_ids),
                      out.mutable_data_ptr(),
                      static_cast<double*>(lse.mutable_data_ptr()),
                      s.B,
                      s.H,
                      s.Hkv,
                      s.Tq,
                      s.Tk,
                      s.D,
                      scale,
                      plane ? plane : s.Tk * s.D};
  if (q.is_cuda()) {
    FR_CUDA_CALL(q, {
      // The decode kernel's split-KV partials: from torch's caching allocator (stream-ordered reuse, no
      // cudaMalloc per decoding step, fine under CUDA graph capture); empty for the other kernels.
      Tensor work = torch::stable::new_empty(q, {fr::attention_fwd_cuda_workspace(p)}, ScalarType::Float);
      p.work = static_cast<float*>(work.mutable_data_ptr());
      fr::attention_fwd_cuda(p, stream);
    });
  } else {
    fr::attention_fwd_cpu(p);
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
                                                        Tensor lse, double scale,
                                                        std::optional<Tensor> segment_ids) {
  check_cpu({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}, {&out, "out"}, {&lse, "lse"}});
  if (segment_ids) check_cpu({{&q, "q"}, {&*segment_ids, "segment_ids"}});
  const AttnShape s = check_attention(q, k, v, segment_ids);
  const fr::DType dtype = float_dtype(q, "q");
  check_same_shape(dout, "dout", q, "q");
  check_same_dtype(dout, "dout", q, "q");
  check_same_shape(out, "out", q, "q");
  check_same_dtype(out, "out", q, "q");
  FR_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.Tq,
           "lse must be (B, H, Tq) = (", s.B, ", ", s.H, ", ", s.Tq, "); got shape ", shape_of(lse));
  check_dtype(lse, "lse", ScalarType::Double);
  if (q.is_cuda()) check_attention_cuda(q, s);
  dout = contig(dout);
  q = contig(q);
  k = contig(k);
  v = contig(v);
  out = contig(out);
  lse = contig(lse);
  Tensor dq = torch::stable::empty_like(q);
  Tensor dk = torch::stable::empty_like(k);
  Tensor dv = torch::stable::empty_like(v);
  fr::AttnBwdParams p{dtype,
                      dout.const_data_ptr(),
                      q.const_data_ptr(),
                      k.const_data_ptr(),
                      v.const_data_ptr(),
                      out.const_data_ptr(),
                      static_cast<const double*>(lse.const_data_ptr()),
                      seg_ptr(segment_ids),
                      dq.mutable_data_ptr(),
                      dk.mutable_data_ptr(),
                      dv.mutable_data_ptr(),
                      s.B,
                      s.H,
                      s.Hkv,
                      s.Tq,
                      s.Tk,
                      s.D,
                      scale};
  if (q.is_cuda()) FR_CUDA_CALL(q, fr::attention_bwd_cuda(p, stream));
  else fr::attention_bwd_cpu(p);
  return {dq, dk, dv};
}

// ---- sample ---------------------------------------------------------------------------------
// A per-row parameter: (B,) of the given dtype (Python expands numbers and 0-d tensors).
void check_row_param(const Tensor& t, const char* name, int64_t B, ScalarType want) {
  FR_CHECK(t.dim() == 1 && t.size(0) == B, name, " must be a number or a (B,) tensor with B = ", B,
           " (rows of logits); got shape ", shape_of(t));
  check_dtype(t, name, want);
}

// The per-row parameters' ranges (CPU tensors): the first bad value is reported with its row.
void check_sample_params(const Tensor& temperature, const Tensor& top_k, const Tensor& top_p, const Tensor& min_p,
                         int64_t B) {
  const auto* temp_p = static_cast<const double*>(temperature.const_data_ptr());  // (B,)
  const auto* k_p = static_cast<const int64_t*>(top_k.const_data_ptr());          // (B,)
  const auto* p_p = static_cast<const double*>(top_p.const_data_ptr());           // (B,)
  const auto* mp_p = static_cast<const double*>(min_p.const_data_ptr());          // (B,)
  for (int64_t b = 0; b < B; ++b) {
    FR_CHECK(std::isfinite(temp_p[b]) && temp_p[b] >= 0.0, "temperature must be finite and >= 0 (0 = greedy); got ",
             temp_p[b], " at row ", b);
    FR_CHECK(k_p[b] >= 0, "top_k must be >= 0 (0 = off); got ", k_p[b], " at row ", b);
    FR_CHECK(p_p[b] > 0.0 && p_p[b] <= 1.0, "top_p must be in (0, 1] (1 = off); got ", p_p[b], " at row ", b);
    FR_CHECK(mp_p[b] >= 0.0 && mp_p[b] <= 1.0, "min_p must be in [0, 1] (0 = off); got ", mp_p[b], " at row ", b);
  }
}

// seed is read on the host wherever it lives (Python draws it on the CPU for CUDA logits too).
std::tuple<Tensor, Tensor> sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p,
                                  Tensor seed) {
  check_cpu({{&logits, "logits"}, {&temperature, "temperature"}, {&top_k, "top_k"}, {&top_p, "top_p"},
             {&min_p, "min_p"}});
  check_dim(logits, "logits", 2, "(B, V)");
  const fr::DType dtype = float_dtype(logits, "logits");
  const int64_t B = logits.size(0), V = logits.size(1);
  FR_CHECK(V >= 1, "logits must have at least one column (V >= 1); got shape ", shape_of(logits));
  FR_CHECK(V < (int64_t(1) << 31), "logits must have fewer than 2^31 columns; got shape ", shape_of(logits));
  check_row_param(temperature, "temperature", B, ScalarType::Double);
  check_row_param(top_k, "top_k", B, ScalarType::Long);
  check_row_param(top_p, "top_p", B, ScalarType::Double);
  check_row_param(min_p, "min_p", B, ScalarType::Double);
  FR_CHECK(seed.numel() == 1, "seed must hold one value; got shape ", shape_of(seed));
  check_dtype(seed, "seed", ScalarType::Long);
  seed = to_cpu(seed);
  logits = contig(logits);
  temperature = contig(temperature);
  top_k = contig(top_k);
  top_p = contig(top_p);
  min_p = contig(min_p);
  const bool cuda = logits.is_cuda();
  if (!cuda) check_sample_params(temperature, top_k, top_p, min_p, B);  // on CUDA: by the kernel
  Tensor tokens = torch::stable::new_empty(logits, {B}, ScalarType::Long);
  Tensor logprobs = torch::stable::new_empty(logits, {B}, ScalarType::Float);
  std::vector<uint8_t> status(size_t(B), fr::kRowOk);
  Tensor status_dev = torch::stable::new_empty(logits, {cuda ? B : 0}, ScalarType::Byte);
  fr::SampleParams p{dtype,
                     logits.const_data_ptr(),
                     static_cast<const double*>(temperature.const_data_ptr()),  // (B,)
                     static_cast<const int64_t*>(top_k.const_data_ptr()),       // (B,)
                     static_cast<const double*>(top_p.const_data_ptr()),        // (B,)
                     static_cast<const double*>(min_p.const_data_ptr()),        // (B,)
                     uint64_t(*static_cast<const int64_t*>(seed.const_data_ptr())),
                     static_cast<int64_t*>(tokens.mutable_data_ptr()),
                     static_cast<float*>(logprobs.mutable_data_ptr()),
                     cuda ? static_cast<uint8_t*>(status_dev.mutable_data_ptr()) : status.data(),
                     B,
                     V};
  if (cuda) {
    FR_CUDA_CALL(logits, fr::sample_cuda(p, status.data(), stream));
  } else {
    fr::sample_cpu(p);
  }
  // The kernel flags bad rows in its first pass; the first one is reported.
  for (int64_t b = 0; b < B; ++b) {
    if (status[size_t(b)] >= 16)  // a bad per-row parameter (CUDA): name it from a host copy
      check_sample_params(to_cpu(temperature), to_cpu(top_k), to_cpu(top_p), to_cpu(min_p), B);
    FR_CHECK(status[size_t(b)] != fr::kRowNaN, "logits must not contain NaN; row ", b, " does");
    FR_CHECK(status[size_t(b)] != fr::kRowPosInf, "logits must not contain +inf; row ", b, " does");
    FR_CHECK(status[size_t(b)] != fr::kRowAllNegInf, "logits row ", b,
             " is all -inf: at least one token must have a finite logit");
  }
  return {tokens, logprobs};
}

// ---- rows_linear ----------------------------------------------------------------------------
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

// ---- gelu (tanh approximation) ----------------------------------------------------------------
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

STABLE_TORCH_LIBRARY(fastrlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("token_logprobs_fwd(Tensor logits, Tensor targets, float temperature, bool return_entropy) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("token_logprobs_bwd(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor targets, "
        "Tensor lse, Tensor mean_scaled, float temperature) -> Tensor");
  m.def("token_logprobs_grad_(Tensor(a!) logits, Tensor targets, float scale) -> Tensor");
  m.def("ppo_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor values, Tensor old_values, "
        "Tensor returns, Tensor mask, Tensor? entropy, float clip_range, float clip_range_value, float vf_coef, "
        "float ent_coef, bool need_grads) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_loss_bwd(Tensor grads, Tensor grad_loss) -> Tensor");
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? segment_ids) "
        "-> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, Tensor? segment_ids) -> (Tensor, Tensor, Tensor)");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed) "
        "-> (Tensor, Tensor)");
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor x, Tensor dy) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gae", TORCH_BOX(&gae));
  m.impl("token_logprobs_fwd", TORCH_BOX(&token_logprobs_fwd));
  m.impl("token_logprobs_bwd", TORCH_BOX(&token_logprobs_bwd));
  m.impl("ppo_loss_fwd", TORCH_BOX(&ppo_loss_fwd));
  m.impl("ppo_loss_bwd", TORCH_BOX(&ppo_loss_bwd));
  m.impl("causal_attention_fwd", TORCH_BOX(&causal_attention_fwd));
  m.impl("causal_attention_bwd", TORCH_BOX(&causal_attention_bwd));
  m.impl("sample", TORCH_BOX(&sample));
  m.impl("rows_linear", TORCH_BOX(&rows_linear));
  m.impl("token_logprobs_grad_", TORCH_BOX(&token_logprobs_grad_));
  m.impl("gelu_fwd", TORCH_BOX(&gelu_fwd));
  m.impl("gelu_bwd", TORCH_BOX(&gelu_bwd));
}

#ifdef FR_WITH_CUDA
// The same functions: each checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("gae", TORCH_BOX(&gae));
  m.impl("token_logprobs_fwd", TORCH_BOX(&token_logprobs_fwd));
  m.impl("token_logprobs_bwd", TORCH_BOX(&token_logprobs_bwd));
  m.impl("ppo_loss_fwd", TORCH_BOX(&ppo_loss_fwd));
  m.impl("ppo_loss_bwd", TORCH_BOX(&ppo_loss_bwd));
  m.impl("causal_attention_fwd", TORCH_BOX(&causal_attention_fwd));
  m.impl("causal_attention_bwd", TORCH_BOX(&causal_attention_bwd));
  m.impl("sample", TORCH_BOX(&sample));
}
#endif
