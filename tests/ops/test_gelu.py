import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from fastrlhf.ops import gelu, reference

INF, NAN = float("inf"), float("nan")


def spread(n: int, dtype=torch.float64) -> torch.Tensor:
    """Normal values (an MLP's pre-activations) plus a sweep over [-12, 12], where both tails turn over."""
    return torch.cat([torch.randn(n, dtype=dtype) * 3, torch.linspace(-12, 12, n, dtype=dtype)])


def torch_grad(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    F.gelu(x, approximate="tanh").backward(dy)
    return x.grad


def test_reference_equals_tanh_formula_in_float64():
    x = spread(4096)
    want = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(reference.gelu(x), want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(reference.gelu(x), F.gelu(x, approximate="tanh"), rtol=1e-13, atol=1e-15)


def test_float32_within_twice_torchs_error():
    """Max abs error vs float64, forward and backward, at most twice F.gelu's own in fp32; 3 * 65536 + 5
    elements so that the comparison is between maxima (and chunks of the thread pool and a tail occur)."""
    x64, dy64 = spread(65536 * 3 // 2 + 3), torch.randn(65536 * 3 + 6, dtype=torch.float64)
    want_y, want_dx = reference.gelu(x64), torch_grad(x64, dy64)
    x = x64.float().requires_grad_()
    y = gelu(x)
    y.backward(dy64.float())
    ours_y, torch_y = (
        (y.double() - want_y).abs().max(),
        (F.gelu(x64.float(), approximate="tanh") - want_y).abs().max(),
    )
    assert ours_y <= 2 * torch_y, (ours_y, torch_y)
    ours_dx = (x.grad.double() - want_dx).abs().max()
    torch_dx = (torch_grad(x64.float(), dy64.float()).double() - want_dx).abs().max()
    assert ours_dx <= 2 * torch_dx, (ours_dx, torch_dx)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023])
def test_ugly_sizes_match_reference_and_the_vector_path(n):
    """Sizes that are not a multiple of 8 go through the tail path; it must give the bits the full-vector
    path gives for the same values (here: the first n of a 1024-element call)."""
    x64 = torch.randn(1024, dtype=torch.float64) * 4
    dy = torch.randn(1024)
    x = x64.float()
    y_full, dx_full = torch.ops.fastrlhf.gelu_fwd(x), torch.ops.fastrlhf.gelu_bwd(x, dy)
    y, dx = (
        torch.ops.fastrlhf.gelu_fwd(x[:n].clone()),
        torch.ops.fastrlhf.gelu_bwd(x[:n].clone(), dy[:n].clone()),
    )
    assert torch.equal(y, y_full[:n]) and torch.equal(dx, dx_full[:n])
    torch.testing.assert_close(y.double(), reference.gelu(x[:n].double()), rtol=4e-7, atol=1e-7)
    torch.testing.assert_close(dx.double(), torch_grad(x[:n].double(), dy[:n].double()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_within_twice_torchs_error(dtype):
    x64, dy64 = spread(1000).to(dtype).double(), torch.randn(2000, dtype=torch.float64).to(dtype).double()
    x = x64.to(dtype).requires_grad_()
    y = gelu(x)
    y.backward(dy64.to(dtype))
    assert y.dtype == dtype and x.grad.dtype == dtype
    want_y, want_dx = reference.gelu(x64), torch_grad(x64, dy64)
    torch_y = F.gelu(x64.to(dtype), approximate="tanh")
    torch_dx = torch_grad(x64.to(dtype), dy64.to(dtype))
    assert (y.double() - want_y).abs().max() <= 2 * (torch_y.double() - want_y).abs().max()
    assert (x.grad.double() - want_dx).abs().max() <= 2 * (torch_dx.double() - want_dx).abs().max()


def test_float64_is_exact_to_fp64_rounding():
    x, dy = spread(3000), torch.randn(6000, dtype=torch.float64)
    torch.testing.assert_close(gelu(x), reference.gelu(x), rtol=1e-14, atol=1e-15)
    xr = x.clone().requires_grad_()
    gelu(xr).backward(dy)
    torch.testing.assert_close(xr.grad, torch_grad(x, dy), rtol=1e-13, atol=1e-14)


def test_gradcheck_float64():
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gelu, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_values(dtype):
    x = torch.tensor([-1e4, -88, -30.5, -0.0, 0.0, 88, 1e4, INF, -INF, NAN, 1e30, -1e30], dtype=dtype)
    y = gelu(x)
    want = torch.tensor([0, 0, 0, 0, 0, 88, 1e4, INF, 0, NAN, 1e30, 0], dtype=dtype)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y[:4]), torch.tensor([True] * 4))  # -0.0 as F.gelu gives
    xr = x.clone().requires_grad_()
    gelu(xr).backward(torch.ones_like(x))
    want_dx = torch.tensor([0, 0, 0, 0.5, 0.5, 1, 1, 1, 0, NAN, 1, 0], dtype=dtype)
    torch.testing.assert_close(xr.grad, want_dx, rtol=0, atol=0, equal_nan=True)


def test_matches_torch_wherever_torch_is_finite():
    x = torch.tensor([-1e4, -88, -5, -1, 0, 1, 5, 88, 1e4])
    torch.testing.assert_close(gelu(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


def test_zero_elements_and_shapes():
    assert gelu(torch.empty(0, 5)).shape == (0, 5)
    x = torch.empty(0, 5, requires_grad=True)
    gelu(x).sum().backward()
    assert x.grad.shape == (0, 5)
    x = torch.randn(2, 3, 7, 5)
    assert gelu(x).shape == (2, 3, 7, 5)
    assert gelu(torch.tensor(0.5)).shape == ()


def test_noncontiguous_input_and_grad():
    x64 = torch.randn(33, 65, dtype=torch.float64)
    x = x64.float().t().requires_grad_()  # (65, 33) strided view
    y = gelu(x)
    torch.testing.assert_close(y, reference.gelu(x64.float()).t())
    dy = torch.randn(33, 65).t()  # strided gradient
    y.backward(dy)
    torch.testing.assert_close(x.grad, torch_grad(x64.t(), dy.double()).float(), rtol=1e-5, atol=1e-6)
    xe = torch.randn(1, 9, requires_grad=True)
    gelu(xe.expand(4, 9)).sum().backward()  # expanded input, stride-0 grad of sum
    torch.testing.assert_close(xe.grad, 4 * torch_grad(xe.detach(), torch.ones(1, 9)), rtol=1e-5, atol=1e-6)


def test_independent_of_thread_count():
    x, dy = torch.randn(2048, 257), torch.randn(2048, 257)  # odd row length: chunk ends fall mid-vector
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastrlhf.gelu_fwd(x), torch.ops.fastrlhf.gelu_bwd(x, dy)
        torch.set_num_threads(2)
        two = torch.ops.fastrlhf.gelu_fwd(x), torch.ops.fastrlhf.gelu_bwd(x, dy)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_baseline_isa_path_matches(tmp_path):
    """FASTRLHF_CPU_PATH=base (a fresh process) runs the portable scalar kernel; it agrees with this one."""
    script = (
        "import sys, torch, fastrlhf\n"
        "from fastrlhf.ops import gelu\n"
        "x = torch.linspace(-12, 12, 1001).requires_grad_()\n"
        "y = gelu(x); y.backward(torch.linspace(-1, 2, 1001))\n"
        "torch.save((fastrlhf.build_info()['cpu_path'], y, x.grad), sys.argv[1])\n"
    )
    out = tmp_path / "base.pt"
    env = {**os.environ, "FASTRLHF_CPU_PATH": "base"}
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env)
    path, y_base, dx_base = torch.load(out)
    assert path == "base"
    x = torch.linspace(-12, 12, 1001).requires_grad_()
    y = gelu(x)
    y.backward(torch.linspace(-1, 2, 1001))
    torch.testing.assert_close(y_base, y, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(dx_base, x.grad, rtol=2e-6, atol=1e-7)


def test_opcheck():
    x = torch.randn(4, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.fastrlhf.gelu_fwd.default, (x,))
    torch.library.opcheck(torch.ops.fastrlhf.gelu_bwd.default, (torch.randn(4, 9), torch.randn(4, 9)))


def test_compile_fullgraph():
    x = torch.randn(4, 9, requires_grad=True)
    f = torch.compile(lambda t: gelu(t * 2).sum(), fullgraph=True, backend="aot_eager")
    f(x).backward()
    g = x.grad.clone()
    x.grad = None
    gelu(x * 2).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_meta_tensors_fall_back_to_torch():
    y = gelu(torch.empty(3, 4, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 4)


# ---- bad input: one test per case -------------------------------------------------------------
def test_rejects_integer_x():
    with pytest.raises(ValueError, match="x must be float32, float64, bfloat16 or float16; got int64"):
        gelu(torch.ones(2, 3, dtype=torch.long))


def test_rejects_bwd_dy_shape():
    with pytest.raises(ValueError, match=r"dy must have the shape of x \(2, 3\); got \(3, 2\)"):
        torch.ops.fastrlhf.gelu_bwd(torch.randn(2, 3), torch.randn(3, 2))


def test_rejects_bwd_dy_dtype():
    with pytest.raises(ValueError, match=r"dy must have the dtype of x \(float32\); got float64"):
        torch.ops.fastrlhf.gelu_bwd(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))
