"""ops.swiglu against the reference in float64 and against torch's own error (F.silu(gate) * up) in
fp32/bf16/fp16, on every CPU path; the infinities, gradcheck, opcheck, torch.compile and bad input."""

import pytest
import torch
import torch.nn.functional as F
from fastrlhf.ops import reference, swiglu
from helpers.cpu_paths import avx2_and_avx512

INF, NAN = float("inf"), float("nan")
LOW = [torch.float32, torch.bfloat16, torch.float16]


def fwd_bwd(fn, g, u, dy):
    g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
    y = fn(g, u)
    y.backward(dy)
    return y.detach(), g.grad, u.grad


def inputs(n, dtype=torch.float64):
    """gate: an MLP's pre-activations plus a sweep over [-20, 20] (both tails of silu); up, dy normal."""
    g = torch.cat([torch.randn(n, dtype=torch.float64) * 3, torch.linspace(-20, 20, n, dtype=torch.float64)])
    u, dy = torch.randn(2 * n, dtype=torch.float64), torch.randn(2 * n, dtype=torch.float64)
    return [t.to(dtype).double() for t in (g, u, dy)]


@pytest.mark.parametrize("n", [1, 7, 8, 17, 1000])
def test_float64_equals_reference(cpu_path, n):
    g, u, dy = inputs(n)
    for name, got, want in zip(
        ("y", "dg", "du"), fwd_bwd(swiglu, g, u, dy), fwd_bwd(reference.swiglu, g, u, dy)
    ):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15, msg=name)


@pytest.mark.parametrize("dtype", LOW)
def test_within_twice_torchs_error(cpu_path, dtype):
    """Max abs error against float64, forward and backward, at most twice F.silu(g) * up's in the dtype;
    3 * 2^15 + 5 elements: the thread pool's chunks and a 16-lane tail occur."""
    g, u, dy = inputs(3 * 2**14 + 3)
    g, u, dy = (t[: 3 * 2**15 + 5].to(dtype).double() for t in (g, u, dy))
    exact = fwd_bwd(reference.swiglu, g, u, dy)
    ours = fwd_bwd(swiglu, g.to(dtype), u.to(dtype), dy.to(dtype))
    torch_ = fwd_bwd(reference.hf_swiglu, g.to(dtype), u.to(dtype), dy.to(dtype))
    for name, o, t, e in zip(("y", "dg", "du"), ours, torch_, exact):
        assert o.dtype == dtype
        err, err_torch = (o.double() - e).abs().max(), (t.double() - e).abs().max()
        assert err <= 2 * err_torch, (name, err.item(), err_torch.item())


def test_negative_tail_keeps_relative_accuracy(cpu_path):
    """silu(g) for g in [-80, -20] is tiny; one exp of -|g| keeps it within a few fp32 ulps."""
    g = torch.linspace(-80, -20, 999)
    got = swiglu(g, torch.ones_like(g)).double()
    want = reference.swiglu(g.double(), torch.ones(999, dtype=torch.float64))
    assert ((got - want).abs() / want.abs()).max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_values(cpu_path, dtype):
    g = torch.tensor([-INF, -1e30, -200.0, -0.0, 0.0, 200.0, 1e30, INF, NAN], dtype=dtype)
    y, dg, du = fwd_bwd(swiglu, g, torch.ones_like(g), torch.ones_like(g))
    torch.testing.assert_close(
        y, torch.tensor([0, 0, 0, 0, 0, 200, 1e30, INF, NAN], dtype=dtype), equal_nan=True
    )
    assert torch.equal(
        torch.signbit(y[:4]), torch.tensor([True] * 4)
    )  # -0.0, as F.silu gives for finite g < 0
    torch.testing.assert_close(
        dg, torch.tensor([0, 0, 0, 0.5, 0.5, 1, 1, 1, NAN], dtype=dtype), equal_nan=True
    )
    torch.testing.assert_close(du, y, equal_nan=True)


def test_matches_torch_wherever_torch_is_finite(cpu_path):
    g, u = torch.linspace(-100, 100, 4001), torch.randn(4001)
    torch.testing.assert_close(swiglu(g, u), F.silu(g) * u, rtol=2e-6, atol=1e-7)


def test_gradcheck_float64(cpu_path):
    g = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (g, u))


def test_vector_paths_agree_bit_for_bit():
    g, u, dy = inputs(1001)
    for dtype in LOW:
        runs = avx2_and_avx512(lambda: fwd_bwd(swiglu, g.to(dtype), u.to(dtype), dy.to(dtype)))
        assert all(torch.equal(a, b) for a, b in zip(*runs)), dtype


def test_shapes_strides_and_empty():
    g64, u64 = torch.randn(33, 65, dtype=torch.float64), torch.randn(65, 33, dtype=torch.float64)
    torch.testing.assert_close(swiglu(g64.t(), u64), reference.swiglu(g64.t(), u64))  # strided gate
    assert swiglu(torch.randn(2, 3, 4), torch.randn(2, 3, 4)).shape == (2, 3, 4)
    g = torch.empty(0, 5, requires_grad=True)
    swiglu(g, torch.empty(0, 5)).sum().backward()
    assert g.grad.shape == (0, 5)


def test_opcheck():
    g, u = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.fastrlhf.swiglu_fwd.default, (g, u))
    torch.library.opcheck(torch.ops.fastrlhf.swiglu_bwd.default, (g.detach(), u.detach(), torch.randn(4, 9)))


def test_compile_fullgraph():
    g, u = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)
    f = torch.compile(lambda a, b: swiglu(a * 2, b).sum(), fullgraph=True, backend="aot_eager")
    f(g, u).backward()
    got = g.grad.clone(), u.grad.clone()
    g.grad = u.grad = None
    swiglu(g * 2, u).sum().backward()
    torch.testing.assert_close(got, (g.grad, u.grad))


@pytest.mark.parametrize(
    "g, u, match",
    [
        (
            torch.ones(2, 3, dtype=torch.long),
            torch.ones(2, 3),
            "gate must be float32, float64, bfloat16 or float16; got int64",
        ),
        (torch.ones(2, 3), torch.ones(3, 2), r"up must have the shape of gate \(2, 3\); got \(3, 2\)"),
        (
            torch.ones(2, 3),
            torch.ones(2, 3, dtype=torch.float64),
            r"up must have the dtype of gate \(float32\); got float64",
        ),
        (
            torch.ones(2, 3),
            torch.ones(2, 3, device="meta"),
            r"up must be on the same device as gate \(cpu\); got meta",
        ),
    ],
)
def test_bad_input(g, u, match):
    with pytest.raises(ValueError, match=match):
        swiglu(g, u)


def test_bad_backward_input():
    with pytest.raises(ValueError, match=r"dy must have the shape of gate \(2, 3\); got \(3, 2\)"):
        torch.ops.fastrlhf.swiglu_bwd(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 2))
