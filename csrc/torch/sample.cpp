// The torch adapter of sample: one token per row of logits with temperature, top-k, top-p and min-p.
#include <cmath>
#include <tuple>
#include <vector>

#include "sample/sample.h"
#include "checks.h"

namespace fr::glue {
namespace {

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

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed) "
        "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("sample", TORCH_BOX(&fr::glue::sample));
}

#ifdef FR_WITH_CUDA
// The same functions: each checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("sample", TORCH_BOX(&fr::glue::sample));
}
#endif
