// The torch adapter of causal_attention: causal (optionally segment-masked) grouped-query attention,
// forward and backward.
#include <cmath>
#include <optional>
#include <tuple>

#include "attention/attention.h"
#include "checks.h"

namespace fr::glue {
namespace {

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

// A NaN or inf scale would silently give NaN outputs, and scale <= 0 turns causal attention into
// attention to the least similar keys; neither is what a caller means.
void check_scale(double scale) {
  FR_CHECK(std::isfinite(scale) && scale > 0.0, "scale must be finite and > 0 (default D**-0.5); got ", scale);
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

const int64_t* seg_ptr(const std::optional<Tensor>& seg) {
  return seg ? static_cast<const int64_t*>(seg->const_data_ptr()) : nullptr;
}

std::tuple<Tensor, Tensor> causal_attention_fwd(Tensor q, Tensor k, Tensor v, double scale,
                                                std::optional<Tensor> segment_ids) {
  check_cpu({{&q, "q"}, {&k, "k"}, {&v, "v"}});
  if (segment_ids) check_cpu({{&q, "q"}, {&*segment_ids, "segment_ids"}});
  const AttnShape s = check_attention(q, k, v, segment_ids);
  check_scale(scale);
  const fr::DType dtype = float_dtype(q, "q");
  if (q.is_cuda()) check_attention_cuda(q, s);
  q = contig(q);
  // A KV-cache view k[:, :, :Tk] of a (B, Hkv, max_len, D) buffer is read in place (no per-step copy) on
  // the CPU and by the CUDA decode kernel (Tq < kAttnDecodeTq); the other CUDA kernels read contiguous k, v.
  const int64_t plane = q.is_cuda() && s.Tq >= fr::kAttnDecodeTq ? 0 : kv_plane(k, v, s);
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
  check_scale(scale);
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

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? segment_ids) "
        "-> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, Tensor? segment_ids) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("causal_attention_fwd", TORCH_BOX(&fr::glue::causal_attention_fwd));
  m.impl("causal_attention_bwd", TORCH_BOX(&fr::glue::causal_attention_bwd));
}

#ifdef FR_WITH_CUDA
// The same functions: each checks its tensors' device and runs the CUDA launcher for CUDA tensors.
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("causal_attention_fwd", TORCH_BOX(&fr::glue::causal_attention_fwd));
  m.impl("causal_attention_bwd", TORCH_BOX(&fr::glue::causal_attention_bwd));
}
#endif
