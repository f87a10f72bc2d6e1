// The only file that touches torch tensors. It uses the torch stable C ABI alone
// (TORCH_TARGET_VERSION 2.10), so one build of fastrlhf loads in later torch releases.
// Each op: check inputs (errors name the argument, the expectation and what came),
// allocate outputs, fill the kernel's params struct, call the kernel.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>

#include "attention/attention.h"
#include "common/runtime.h"
#include "gae/gae.h"

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

const int64_t* seg_ptr(const std::optional<Tensor>& seg) {
  return seg ? static_cast<const int64_t*>(seg->const_data_ptr()) : nullptr;
}

std::tuple<Tensor, Tensor> causal_attention_fwd(Tensor q, Tensor k, Tensor v, double scale,
                                                std::optional<Tensor> segment_ids) {
  check_cpu({{&q, "q"}, {&k, "k"}, {&v, "v"}});
  if (segment_ids) check_cpu({{&q, "q"}, {&*segment_ids, "segment_ids"}});
  const AttnShape s = check_attention(q, k, v, segment_ids);
  const fr::DType dtype = float_dtype(q, "q");
  q = contig(q);
  k = contig(k);
  v = contig(v);
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
                      scale};
  fr::attention_fwd_cpu(p);
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
  fr::attention_bwd_cpu(p);
  return {dq, dk, dv};
}

}  // namespace

STABLE_TORCH_LIBRARY(fastrlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? segment_ids) "
        "-> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, Tensor? segment_ids) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gae", TORCH_BOX(&gae));
  m.impl("causal_attention_fwd", TORCH_BOX(&causal_attention_fwd));
  m.impl("causal_attention_bwd", TORCH_BOX(&causal_attention_bwd));
}
