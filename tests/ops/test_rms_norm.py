"""ops.rms_norm against the reference in float64 and against HF's formula's own error in fp32/bf16/fp16,
on every CPU path; gradcheck, opcheck, torch.compile and bad input."""

import pytest
import torch
from fastrlhf.ops import reference, rms_norm
from helpers.cpu_paths import avx2_and_avx512

EPS = 1e-5
LOW = [torch.float32, torch.bfloat16, torch.float16]


def fwd_bwd(fn, x, w, dy):
    """y, dx, dw of fn(x, w, EPS) for the upstream gradient dy."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, EPS)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def inputs(shape, dtype=torch.float64):
    """x (an activation with a few large rows), w around 1, dy; each exactly representable in dtype."""
    x = torch.randn(shape, dtype=torch.float64) * torch.rand(*shape[:-1], 1, dtype=torch.float64) * 4
    w = 1 + 0.3 * torch.randn(shape[-1], dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    return [t.to(dtype).double() for t in (x, w, dy)]


@pytest.mark.parametrize("shape", [(97, 59), (1, 1, 576), (2, 3, 64), (5, 80), (3, 1000), (1, 1)])
def test_float64_equals_reference(cpu_path, shape):
    x, w, dy = inputs(shape)
    for name, got, want in zip(
        ("y", "dx", "dw"), fwd_bwd(rms_norm, x, w, dy), fwd_bwd(reference.rms_norm, x, w, dy)
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", LOW)
def test_within_twice_torchs_error(cpu_path, dtype):
    """Max abs error of y, dx, dw against the float64 reference: at most twice that of HF's LlamaRMSNorm
    formula run by torch in the same dtype (odd sizes: 4 x 97 rows of C = 59, and C = 576)."""
    for shape in [(4, 97, 59), (2, 64, 576)]:
        x, w, dy = inputs(shape, dtype)
        exact = fwd_bwd(reference.rms_norm, x, w, dy)
        ours = fwd_bwd(rms_norm, x.to(dtype), w.to(dtype), dy.to(dtype))
        torch_ = fwd_bwd(reference.hf_rms_norm, x.to(dtype), w.to(dtype), dy.to(dtype))
        for name, o, t, e in zip(("y", "dx", "dw"), ours, torch_, exact):
            assert o.dtype == dtype
            err, err_torch = (o.double() - e).abs().max(), (t.double() - e).abs().max()
            assert err <= 2 * err_torch, (shape, name, err.item(), err_torch.item())


def test_fp32_weight_with_half_x(cpu_path):
    """Under autocast the weight stays fp32 while x is bf16: y in x's dtype, dw in fp32."""
    x, w, dy = inputs((3, 33, 64), torch.bfloat16)
    y, dx, dw = fwd_bwd(rms_norm, x.bfloat16(), w.float(), dy.bfloat16())
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    want = fwd_bwd(reference.rms_norm, x, w, dy)
    torch.testing.assert_close(y.double(), want[0], rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(dx.double(), want[1], rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-4)


def test_gradcheck_float64(cpu_path):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, EPS), (x, w))


def test_vector_paths_agree_bit_for_bit():
    """The AVX2 and AVX-512 builds reduce the same 16 lanes in the same tree: same bits (CPUs differ
    between development and CI machines, results must not)."""
    x, w, dy = inputs((200, 83))
    for dtype in LOW:
        runs = avx2_and_avx512(lambda: fwd_bwd(rms_norm, x.to(dtype), w.to(dtype), dy.to(dtype)))
        for a, b in zip(*runs):
            assert torch.equal(a, b), dtype


def test_independent_of_thread_count():
    x, w, dy = (t.float() for t in inputs((1000, 96)))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fwd_bwd(rms_norm, x, w, dy)
        torch.set_num_threads(2)
        two = fwd_bwd(rms_norm, x, w, dy)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_strided_and_empty_inputs():
    x64 = torch.randn(64, 40, dtype=torch.float64)
    w = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(rms_norm(x64.t(), w, EPS), reference.rms_norm(x64.t(), w, EPS))
    x = torch.empty(0, 5, requires_grad=True)
    w = torch.ones(5, requires_grad=True)
    rms_norm(x, w, EPS).sum().backward()
    assert x.grad.shape == (0, 5) and torch.equal(w.grad, torch.zeros(5))


def test_opcheck():
    x, w = torch.randn(4, 9, requires_grad=True), torch.randn(9, requires_grad=True)
    torch.library.opcheck(torch.ops.fastrlhf.rms_norm_fwd.default, (x, w, EPS))
    _, rstd = torch.ops.fastrlhf.rms_norm_fwd(x.detach(), w.detach(), EPS)
    torch.library.opcheck(
        torch.ops.fastrlhf.rms_norm_bwd.default, (torch.randn(4, 9), x.detach(), w.detach(), rstd)
    )


def test_compile_fullgraph():
    x, w = torch.randn(4, 9, requires_grad=True), torch.randn(9, requires_grad=True)
    f = torch.compile(lambda a, b: rms_norm(a * 2, b, EPS).sum(), fullgraph=True, backend="aot_eager")
    f(x, w).backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    rms_norm(x * 2, w, EPS).sum().backward()
    torch.testing.assert_close(got, (x.grad, w.grad))


# ---- bad input: the error names the argument, what was expected and what came -------------------------
@pytest.mark.parametrize(
    "x, w, eps, match",
    [
        (
            torch.ones(2, 3, dtype=torch.long),
            torch.ones(3),
            EPS,
            "x must be float32, float64, bfloat16 or float16; got int64",
        ),
        (torch.ones(2, 59), torch.ones(58), EPS, r"weight must be \(C,\) = \(59,\); got \(58\)"),
        (
            torch.ones(2, 3, dtype=torch.bfloat16),
            torch.ones(3, dtype=torch.half),
            EPS,
            r"weight must have the dtype of x \(bfloat16\) or float32; got float16",
        ),
        (torch.ones(2, 3), torch.ones(3), -1.0, "eps must be a finite number >= 0; got -1"),
        (torch.ones(2, 3), torch.ones(3), float("nan"), "eps must be a finite number >= 0; got nan"),
        (
            torch.tensor(1.0),
            torch.ones(1),
            EPS,
            r"x must be \(\.\.\., C\) with at least one dim; got shape \(\)",
        ),
        (
            torch.ones(2, 3),
            torch.ones(3, device="meta"),
            EPS,
            r"weight must be on the same device as x \(cpu\); got meta",
        ),
    ],
)
def test_bad_input(x, w, eps, match):
    with pytest.raises(ValueError, match=match):
        rms_norm(x, w, eps)


def test_bad_backward_input():
    x, w = torch.randn(2, 3), torch.ones(3)
    _, rstd = torch.ops.fastrlhf.rms_norm_fwd(x, w, EPS)
    with pytest.raises(ValueError, match=r"dy must have the shape of x \(2, 3\); got \(3, 2\)"):
        torch.ops.fastrlhf.rms_norm_bwd(torch.randn(3, 2), x, w, rstd)
    with pytest.raises(ValueError, match="rstd must be float32; got float64"):
        torch.ops.fastrlhf.rms_norm_bwd(torch.randn(2, 3), x, w, rstd.double())
    with pytest.raises(ValueError, match=r"rstd must hold one value per row of x \(2\); got shape \(3\)"):
        torch.ops.fastrlhf.rms_norm_bwd(torch.randn(2, 3), x, w, torch.ones(3))
