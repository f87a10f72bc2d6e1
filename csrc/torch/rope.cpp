// The torch adapter of rope: rotary embeddings on q and k together. The forward takes the heads as the
// projections give them, (B, T, H, D), and returns them rotated in attention's layout, (B, H, T, D); the
// backward takes gradients in (B, H, T, D) and returns (B, T, H, D). Inputs are read at their strides
// (rows of D must be contiguous, else they are copied); outputs are contiguous.
#include <tuple>

#include "rope/rope.h"
#include "checks.h"

namespace fr::glue {
namespace {

// q and k are (B, T, H, D) when !heads_first, (B, H, T, D) when heads_first; returns their dtype.
fr::DType check_rope(const Tensor& q, const char* qn, const Tensor& k, const char* kn, const Tensor& positions,
                     const Tensor& inv_freq, bool heads_first) {
  check_cpu({{&q, qn}, {&k, kn}, {&positions, "positions"}, {&inv_freq, "inv_freq"}});
  const char* layout = heads_first ? "(B, H, T, D)" : "(B, T, H, D)";
  check_dim(q, qn, 4, layout);
  check_dim(k, kn, 4, heads_first ? "(B, Hkv, T, D)" : "(B, T, Hkv, D)");
  const fr::DType dtype = float_dtype(q, qn);
  check_same_dtype(k, kn, q, qn);
  const int64_t B = q.size(0), T = q.size(heads_first ? 2 : 1), D = q.size(3);
  FR_CHECK(D % 2 == 0 && D >= 2 && D <= fr::kRopeMaxD, qn, " must have an even head dim D in [2, ", fr::kRopeMaxD,
           "]; got shape ", shape_of(q));
  const bool k_fits = k.size(0) == B && k.size(heads_first ? 2 : 1) == T && k.size(3) == D;
  if (heads_first)
    FR_CHECK(k_fits, kn, " must be (B, Hkv, T, D) = (", B, ", Hkv, ", T, ", ", D, "); got shape ", shape_of(k));
  else
    FR_CHECK(k_fits, kn, " must be (B, T, Hkv, D) = (", B, ", ", T, ", Hkv, ", D, "); got shape ", shape_of(k));
  check_dtype(positions, "positions", ScalarType::Long);
  FR_CHECK((positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T) ||
               (positions.dim() == 1 && positions.size(0) == T),
           "positions must be (B, T) = (", B, ", ", T, ") or (T,) = (", T, ",); got shape ", shape_of(positions));
  check_dtype(inv_freq, "inv_freq", ScalarType::Float);
  FR_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == D / 2, "inv_freq must be (D/2,) = (", D / 2, ",); got shape ",
           shape_of(inv_freq));
  return dtype;
}

Tensor rows_contiguous(const Tensor& t) { return t.stride(3) == 1 ? t : torch::stable::contiguous(t); }

// x (B, T, H, D) -> y (B, H, T, D) when !heads_first, the reverse when heads_first; y is allocated here.
fr::RopeTensor rope_io(const Tensor& x, Tensor& y, bool heads_first) {
  const int64_t B = x.size(0), D = x.size(3);
  const int64_t T = x.size(heads_first ? 2 : 1), H = x.size(heads_first ? 1 : 2);
  y = torch::stable::new_empty(x, heads_first ? std::vector<int64_t>{B, T, H, D} : std::vector<int64_t>{B, H, T, D});
  fr::RopeTensor r{x.const_data_ptr(), y.mutable_data_ptr(), H, x.stride(0), 0, 0, y.stride(0), 0, 0};
  if (heads_first) {  // x (B, H, T, D), y (B, T, H, D)
    r.xs_t = x.stride(2), r.xs_h = x.stride(1), r.ys_t = y.stride(1), r.ys_h = y.stride(2);
  } else {  // x (B, T, H, D), y (B, H, T, D)
    r.xs_t = x.stride(1), r.xs_h = x.stride(2), r.ys_t = y.stride(2), r.ys_h = y.stride(1);
  }
  return r;
}

std::tuple<Tensor, Tensor> rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, bool inverse) {
  const fr::DType dtype = inverse ? check_rope(q, "dq", k, "dk", positions, inv_freq, true)
                                  : check_rope(q, "q", k, "k", positions, inv_freq, false);
  q = rows_contiguous(q);
  k = rows_contiguous(k);
  positions = contig(positions);
  inv_freq = contig(inv_freq);
  Tensor q_out, k_out;
  fr::RopeParams p{dtype,
                   rope_io(q, q_out, inverse),
                   rope_io(k, k_out, inverse),
                   static_cast<const int64_t*>(positions.const_data_ptr()),
                   positions.dim() == 2 ? positions.stride(0) : 0,
                   static_cast<const float*>(inv_freq.const_data_ptr()),
                   q.size(0),
                   q.size(inverse ? 2 : 1),
                   q.size(3),
                   inverse};
  if (q.is_cuda()) FR_CUDA_CALL(q, fr::rope_cuda(p, stream));
  else fr::rope_cpu(p);
  return {q_out, k_out};
}

std::tuple<Tensor, Tensor> rope_fwd(Tensor q, Tensor k, Tensor positions, Tensor inv_freq) {
  return rope(q, k, positions, inv_freq, false);
}

std::tuple<Tensor, Tensor> rope_bwd(Tensor dq, Tensor dk, Tensor positions, Tensor inv_freq) {
  return rope(dq, dk, positions, inv_freq, true);
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("rope_fwd(Tensor q, Tensor k, Tensor positions, Tensor inv_freq) -> (Tensor, Tensor)");
  m.def("rope_bwd(Tensor dq, Tensor dk, Tensor positions, Tensor inv_freq) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("rope_fwd", TORCH_BOX(&fr::glue::rope_fwd));
  m.impl("rope_bwd", TORCH_BOX(&fr::glue::rope_bwd));
}

#ifdef FR_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("rope_fwd", TORCH_BOX(&fr::glue::rope_fwd));
  m.impl("rope_bwd", TORCH_BOX(&fr::glue::rope_bwd));
}
#endif
