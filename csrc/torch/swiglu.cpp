// The torch adapter of swiglu: silu(gate) * up, forward and backward, over any shape.
#include <tuple>

#include "swiglu/swiglu.h"
#include "checks.h"

namespace fr::glue {
namespace {

fr::DType check_gate_up(const Tensor& gate, const Tensor& up) {
  const fr::DType dtype = float_dtype(gate, "gate");
  check_same_dtype(up, "up", gate, "gate");
  check_same_shape(up, "up", gate, "gate");
  return dtype;
}

Tensor swiglu_fwd(Tensor gate, Tensor up) {
  check_cpu({{&gate, "gate"}, {&up, "up"}});
  const fr::DType dtype = check_gate_up(gate, up);
  gate = contig(gate);
  up = contig(up);
  Tensor y = torch::stable::empty_like(gate);
  fr::SwigluFwdParams p{dtype, gate.const_data_ptr(), up.const_data_ptr(), y.mutable_data_ptr(), gate.numel()};
  if (gate.is_cuda()) FR_CUDA_CALL(gate, fr::swiglu_fwd_cuda(p, stream));
  else fr::swiglu_fwd_cpu(p);
  return y;
}

std::tuple<Tensor, Tensor> swiglu_bwd(Tensor gate, Tensor up, Tensor dy) {
  check_cpu({{&gate, "gate"}, {&up, "up"}, {&dy, "dy"}});
  const fr::DType dtype = check_gate_up(gate, up);
  check_same_dtype(dy, "dy", gate, "gate");
  check_same_shape(dy, "dy", gate, "gate");
  gate = contig(gate);
  up = contig(up);
  dy = contig(dy);
  Tensor dgate = torch::stable::empty_like(gate);
  Tensor dup = torch::stable::empty_like(gate);
  fr::SwigluBwdParams p{dtype,
                        gate.const_data_ptr(),
                        up.const_data_ptr(),
                        dy.const_data_ptr(),
                        dgate.mutable_data_ptr(),
                        dup.mutable_data_ptr(),
                        gate.numel()};
  if (gate.is_cuda()) FR_CUDA_CALL(gate, fr::swiglu_bwd_cuda(p, stream));
  else fr::swiglu_bwd_cpu(p);
  return {dgate, dup};
}

}  // namespace
}  // namespace fr::glue

STABLE_TORCH_LIBRARY_FRAGMENT(fastrlhf, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor gate, Tensor up, Tensor dy) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("swiglu_fwd", TORCH_BOX(&fr::glue::swiglu_fwd));
  m.impl("swiglu_bwd", TORCH_BOX(&fr::glue::swiglu_bwd));
}

#ifdef FR_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("swiglu_fwd", TORCH_BOX(&fr::glue::swiglu_fwd));
  m.impl("swiglu_bwd", TORCH_BOX(&fr::glue::swiglu_bwd));
}
#endif
