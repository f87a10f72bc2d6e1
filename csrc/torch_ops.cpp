// The only file that touches torch tensors. It uses the torch stable C ABI alone
// (TORCH_TARGET_VERSION 2.10), so one build of fastrlhf loads in later torch releases.
// Each op: check inputs (errors name the argument, the expectation and what came),
// allocate outputs, fill the kernel's params struct, call the kernel.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common/runtime.h"
#include "gae/gae.h"
#include "sample/sample.h"

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

void check_cpu(std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
  const Tensor& first = *ts.begin()->first;
  for (auto [t, name] : ts) {
    FR_CHECK(t->get_device() == first.get_device() && t->is_cpu() == first.is_cpu(), name,
                    " must be on the same device as ", ts.begin()->second, "; got ",
                    t->is_cpu() ? "cpu" : "cuda", " vs ", first.is_cpu() ? "cpu" : "cuda");
    FR_CHECK(t->is_cpu(), name, " must be a CPU tensor (this build of fastrlhf has no CUDA kernels)");
  }
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
  fr::gae_cpu(p);
  return {advantages, returns};
}

// ---- sample ---------------------------------------------------------------------------------
// A per-row parameter: (B,) of the given dtype (Python expands numbers and 0-d tensors).
void check_row_param(const Tensor& t, const char* name, int64_t B, ScalarType want) {
  FR_CHECK(t.dim() == 1 && t.size(0) == B, name, " must be a number or a (B,) tensor with B = ", B,
           " (rows of logits); got shape ", shape_of(t));
  check_dtype(t, name, want);
}

std::tuple<Tensor, Tensor> sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p,
                                  Tensor seed) {
  check_cpu({{&logits, "logits"}, {&temperature, "temperature"}, {&top_k, "top_k"}, {&top_p, "top_p"},
             {&min_p, "min_p"}, {&seed, "seed"}});
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
  logits = contig(logits);
  temperature = contig(temperature);
  top_k = contig(top_k);
  top_p = contig(top_p);
  min_p = contig(min_p);
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
  Tensor tokens = torch::stable::new_empty(logits, {B}, ScalarType::Long);
  Tensor logprobs = torch::stable::new_empty(logits, {B}, ScalarType::Float);
  std::vector<uint8_t> status(size_t(B), fr::kRowOk);
  fr::SampleParams p{dtype,
                     logits.const_data_ptr(),
                     temp_p,
                     k_p,
                     p_p,
                     mp_p,
                     uint64_t(*static_cast<const int64_t*>(seed.const_data_ptr())),
                     static_cast<int64_t*>(tokens.mutable_data_ptr()),
                     static_cast<float*>(logprobs.mutable_data_ptr()),
                     status.data(),
                     B,
                     V};
  fr::sample_cpu(p);
  // The kernel flags bad rows in its first pass; the first one is reported.
  for (int64_t b = 0; b < B; ++b) {
    FR_CHECK(status[size_t(b)] != fr::kRowNaN, "logits must not contain NaN; row ", b, " does");
    FR_CHECK(status[size_t(b)] != fr::kRowPosInf, "logits must not contain +inf; row ", b, " does");
    FR_CHECK(status[size_t(b)] != fr::kRowAllNegInf, "logits row ", b,
             " is all -inf: at least one token must have a finite logit");
  }
  return {tokens, logprobs};
}

}  // namespace

STABLE_TORCH_LIBRARY(fastrlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed) "
        "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gae", TORCH_BOX(&gae));
  m.impl("sample", TORCH_BOX(&sample));
}
