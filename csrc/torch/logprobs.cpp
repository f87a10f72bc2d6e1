// The torch adapter of token_logprobs: per-token log-probabilities and entropies of softmax(logits / T),
// forward and backward, and the in-place gradient the fused LM-head loss uses between its GEMMs.
#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "logprobs/logprobs.h"
#include "checks.h"

namespace fr::glue {
namespace {

std::vector<int64_t> leading_shape(const Tensor& t) {  // t.shape[:-1]
  std::vector<int64_t> s;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) s.push_back(t.size(i));
  return s;
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
  Tensor logprobs = torch::stable::new_empty(logits, lead);
  Tensor entropy = torch::stable::new_empty(logits, ent_shape);
  // float64 for every dtype, relative to each row's max logit (logprobs.h): lse (..., 2) = (max, log S)
  std::vector<int64_t> lse_shape = lead;
  lse_shape.push_back(2);
  Tensor lse = torch::stable::new_empty(logits, lse_shape, ScalarType::Double);
  Tensor mean_scaled = torch::stable::new_empty(logits, ent_shape, ScalarType::Double);
  const int64_t V = logits.size(logits.dim() - 1);
  int64_t bad_row = -1, bad_target = 0;
  fr::TokenLogprobsFwdParams p{dtype,
                               logits.const_data_ptr(),
                               offsets.data(),
                               static_cast<const int64_t*>(targets.const_data_ptr()),
                               logprobs.mutable_data_ptr(),
                               return_entropy ? entropy.mutable_data_ptr() : nullptr,
                               static_cast<double*>(lse.mutable_data_ptr()),
                               return_entropy ? static_cast<double*>(mean_scaled.mutable_data_ptr()) : nullptr,
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
  std::vector<int64_t> lse_shape = leading_shape(logits);
  lse_shape.push_back(2);
  bool lse_ok = lse.dim() == int64_t(lse_shape.size());
  for (int64_t i = 0; lse_ok && i < lse.dim(); ++i) lse_ok = lse.size(i) == lse_shape[size_t(i)];
  FR_CHECK(lse_ok, "lse must have the shape logits.shape[:-1] + (2,) = ", shape_str(lse_shape), "; got ",
           shape_of(lse));
  check_dtype(lse, "lse", ScalarType::Double);
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
    check_dtype(mean_scaled, "mean_scaled", ScalarType::Double);
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
                               static_cast<const double*>(lse.const_data_ptr()),
                               grad_entropy ? static_cast<const double*>(mean_scaled.const_data_ptr()) : nullptr,
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

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor targets, float temperature, bool return_entropy) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("token_logprobs_bwd(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor targets, "
        "Tensor lse, Tensor mean_scaled, float temperature) -> Tensor");
  m.def("token_logprobs_grad_(Tensor(a!) logits, Tensor targets, float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("token_logprobs_fwd", TORCH_BOX(&fr::glue::token_logprobs_fwd));
  m.impl("token_logprobs_bwd", TORCH_BOX(&fr::glue::token_logprobs_bwd));
  m.impl("token_logprobs_grad_", TORCH_BOX(&fr::glue::token_logprobs_grad_));
}

#ifdef FR_WITH_CUDA
// The same functions: each checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("token_logprobs_fwd", TORCH_BOX(&fr::glue::token_logprobs_fwd));
  m.impl("token_logprobs_bwd", TORCH_BOX(&fr::glue::token_logprobs_bwd));
}
#endif
