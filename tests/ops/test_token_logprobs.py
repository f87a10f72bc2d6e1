import fastrlhf
import pytest
import torch
from fastrlhf.ops import reference, token_logprobs


def make(shape, V, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(*shape, V, dtype=torch.float64) * scale).to(dtype)  # (..., V)
    targets = torch.randint(0, V, shape)  # (...)
    return logits, targets


def ref64(logits, targets, temperature=1.0):
    """The reference in float64 on the very values the kernel saw."""
    return reference.token_logprobs(logits.double(), targets, temperature=temperature, return_entropy=True)


def grads(fn, logits, targets, g_lp, g_h, **kw):
    """d logits of sum(g_lp * logprobs + g_h * entropy)."""
    x = logits.detach().requires_grad_()
    lp, h = fn(x, targets, return_entropy=True, **kw)
    torch.autograd.backward((lp, h), (g_lp.to(lp.dtype), g_h.to(h.dtype)))
    return x.grad


def test_extension_is_loaded():
    assert fastrlhf.HAS_EXT, "the tests must exercise the compiled ops, not the fallback"


@pytest.mark.parametrize(
    "shape,V", [((1,), 1), ((1,), 7), ((3,), 7), ((2, 5), 97), ((4,), 4100), ((2,), 50257)]
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_values_and_grads_match_float64_reference(shape, V, temperature):
    logits, targets = make(shape, V)
    lp, h = token_logprobs(logits, targets, temperature=temperature, return_entropy=True)
    ref_lp, ref_h = ref64(logits, targets, temperature)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == targets.shape
    torch.testing.assert_close(lp.double(), ref_lp, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(h.double(), ref_h, rtol=2e-6, atol=2e-6)
    g_lp, g_h = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    d = grads(token_logprobs, logits, targets, g_lp, g_h, temperature=temperature)
    ref_d = grads(reference.token_logprobs, logits.double(), targets, g_lp, g_h, temperature=temperature)
    assert d.dtype == torch.float32 and d.shape == logits.shape
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=2e-6)


def test_float64_is_exact_to_rounding():
    logits, targets = make((6,), 333, torch.float64)
    lp, h = token_logprobs(logits, targets, temperature=1.3, return_entropy=True)
    ref_lp, ref_h = ref64(logits, targets, 1.3)
    torch.testing.assert_close((lp, h), (ref_lp, ref_h), rtol=1e-12, atol=1e-12)


def test_logprobs_only_matches_and_its_gradient_ignores_entropy():
    logits, targets = make((5,), 300)
    lp = token_logprobs(logits, targets)
    torch.testing.assert_close(lp.double(), ref64(logits, targets)[0], rtol=2e-6, atol=2e-6)
    x = logits.clone().requires_grad_()
    token_logprobs(x, targets).sum().backward()
    xr = logits.double().requires_grad_()
    reference.token_logprobs(xr, targets).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_through_one_output_only(which):
    logits, targets = make((4,), 50)
    x, xr = logits.clone().requires_grad_(), logits.double().requires_grad_()
    out = token_logprobs(x, targets, return_entropy=True)[which == "entropy"]
    ref = reference.token_logprobs(xr, targets, return_entropy=True)[which == "entropy"]
    (out * torch.arange(4)).sum().backward()
    (ref * torch.arange(4)).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


def test_gradcheck_with_entropy_and_temperature():
    logits, targets = make((3, 2), 11, torch.float64)
    for T in (1.0, 0.6):

        def fn(x, T=T):
            return token_logprobs(x, targets, temperature=T, return_entropy=True)

        assert torch.autograd.gradcheck(fn, (logits.requires_grad_(),))


def test_three_d_noncontiguous_views_read_in_place():
    logits, targets = make((3, 9), 37)
    view = logits[:, :-1]  # (3, 8, V): rows strided, last dim contiguous
    tview = targets[:, 1:]  # (3, 8)
    lp, h = token_logprobs(view, tview, return_entropy=True)
    ref_lp, ref_h = ref64(view, tview)
    torch.testing.assert_close((lp.double(), h.double()), (ref_lp, ref_h), rtol=2e-6, atol=2e-6)
    t_major = logits.transpose(0, 1)  # (9, 3, V)
    lp2 = token_logprobs(t_major, targets.t())
    torch.testing.assert_close(lp2.double(), ref64(t_major, targets.t())[0], rtol=2e-6, atol=2e-6)


def test_last_dim_strided_logits():
    base, targets = make((4,), 64)
    strided = torch.randn(4, 128)[:, ::2].copy_(base)  # (4, 64) with stride 2 along V
    assert strided.stride(-1) == 2
    torch.testing.assert_close(
        token_logprobs(strided, targets), token_logprobs(base, targets), rtol=0, atol=0
    )
    d1 = grads(token_logprobs, strided, targets, torch.ones(4), torch.ones(4))
    d2 = grads(token_logprobs, base, targets, torch.ones(4), torch.ones(4))
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


def test_one_dimensional_logits():
    logits, targets = make((), 10)
    lp, h = token_logprobs(logits, targets, return_entropy=True)
    assert lp.shape == h.shape == ()
    torch.testing.assert_close((lp.double(), h.double()), ref64(logits, targets), rtol=2e-6, atol=2e-6)


def test_empty_leading_dims():
    lp, h = token_logprobs(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert lp.shape == h.shape == (0,)


def test_large_offsets_and_masked_vocab():
    logits, targets = make((3,), 3000)
    logits = logits + 1000.0  # entropy computed relative to the row max: no cancellation
    logits[:, :2500] = float("-inf")  # banned tokens, including whole leading chunks
    targets[:] = 2999
    lp, h = token_logprobs(logits, targets, return_entropy=True)
    keep = logits[:, 2500:].double()
    ref_lp, ref_h = ref64(keep, targets - 2500)
    torch.testing.assert_close((lp.double(), h.double()), (ref_lp, ref_h), rtol=2e-6, atol=5e-6)
    d = grads(token_logprobs, logits, targets, torch.ones(3), torch.ones(3))
    assert torch.isfinite(d).all() and (d[:, :2500] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_within_twice_pytorch_error(dtype):
    logits, targets = make((64,), 1000, dtype, scale=2.0)
    ref_lp, ref_h = ref64(logits, targets)  # exact answer for these (rounded) logits
    lp, h = token_logprobs(logits, targets, return_entropy=True)
    # PyTorch's own error: the same formula evaluated in the dtype
    logp_t = torch.log_softmax(logits, dim=-1)
    torch_lp = logp_t.gather(-1, targets[:, None]).squeeze(-1)
    torch_h = -(logp_t.exp() * logp_t).sum(-1)
    assert lp.dtype == h.dtype == dtype
    for ours, theirs, ref in ((lp, torch_lp, ref_lp), (h, torch_h, ref_h)):
        assert (ours.double() - ref).abs().max() <= 2 * (theirs.double() - ref).abs().max()
    g = torch.randn(64, dtype=torch.float64)
    d = grads(token_logprobs, logits, targets, g, g)
    d_ref = grads(reference.token_logprobs, logits.double(), targets, g, g)
    d_torch = logits.detach().requires_grad_()
    logp_t = torch.log_softmax(d_torch, dim=-1)
    out = logp_t.gather(-1, targets[:, None]).squeeze(-1) - (logp_t.exp() * logp_t).sum(-1)
    out.backward(g.to(dtype))
    assert d.dtype == dtype
    assert (d.double() - d_ref).abs().max() <= 2 * (d_torch.grad.double() - d_ref).abs().max()


def test_baseline_isa_path_matches(tmp_path):
    """FASTRLHF_CPU_PATH=base (a fresh process) runs the portable kernels; they agree with this one's."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch, fastrlhf\n"
        "from fastrlhf.ops import token_logprobs\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(5, 1001).requires_grad_(); t = torch.randint(0, 1001, (5,))\n"
        "lp, h = token_logprobs(x, t, temperature=0.9, return_entropy=True)\n"
        "(lp.sum() + 2 * h.sum()).backward()\n"
        "torch.save((fastrlhf.build_info()['cpu_path'], lp, h, x.grad), sys.argv[1])\n"
    )
    out = tmp_path / "base.pt"
    subprocess.run(
        [sys.executable, "-c", script, str(out)], check=True, env={**os.environ, "FASTRLHF_CPU_PATH": "base"}
    )
    path, *base = torch.load(out)
    assert path == "base"
    torch.manual_seed(0)
    x = torch.randn(5, 1001).requires_grad_()
    t = torch.randint(0, 1001, (5,))
    lp, h = token_logprobs(x, t, temperature=0.9, return_entropy=True)
    (lp.sum() + 2 * h.sum()).backward()
    torch.testing.assert_close(base, [lp, h, x.grad], rtol=1e-5, atol=1e-6)


def test_independent_of_thread_count():
    logits, targets = make((64,), 3001)
    old = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            x = logits.clone().requires_grad_()
            lp, h = token_logprobs(x, targets, return_entropy=True)
            (lp.sum() + h.sum()).backward()
            runs.append((lp, h, x.grad))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck():
    logits, targets = make((3, 4), 17)
    for ent in (False, True):
        torch.library.opcheck(
            torch.ops.fastrlhf.token_logprobs_fwd.default, (logits.requires_grad_(), targets, 0.8, ent)
        )


def test_compile_fullgraph_forward_and_backward():
    logits, targets = make((4, 3), 29)

    def f(x, t):
        lp, h = token_logprobs(x, t, temperature=0.9, return_entropy=True)
        return (lp * 2 + h).sum()

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y1, y2 = compiled(x1, targets), f(x2, targets)
    y1.backward()
    y2.backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)


# ---- bad input: one test per case -------------------------------------------------------------
def test_rejects_targets_shape():
    with pytest.raises(
        ValueError, match=r"targets must have the shape of logits.shape\[:-1\] \(2, 3\); got \(2, 4\)"
    ):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_rejects_int32_targets():
    with pytest.raises(ValueError, match="targets must be int64; got int32"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.int32))


def test_rejects_targets_out_of_range_with_position():
    targets = torch.zeros(2, 3, dtype=torch.long)
    targets[1, 2] = 5
    with pytest.raises(
        ValueError, match=r"targets must be in \[0, V\) = \[0, 5\); got 5 at position \(1, 2\)"
    ):
        token_logprobs(torch.randn(2, 3, 5), targets)


def test_rejects_negative_target():
    with pytest.raises(ValueError, match=r"got -1 at position \(0\)"):
        token_logprobs(torch.randn(2, 5), torch.tensor([-1, 0]))


def test_rejects_integer_logits():
    with pytest.raises(ValueError, match="logits must be float32, float64, bfloat16 or float16; got int64"):
        token_logprobs(torch.ones(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_rejects_nonpositive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


def test_rejects_empty_vocabulary():
    with pytest.raises(
        ValueError, match=r"logits must have V >= 1 classes in its last dim; got shape \(2, 0\)"
    ):
        token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


def test_rejects_zero_dim_logits():
    with pytest.raises(ValueError, match=r"logits must be \(..., V\); got shape \(\)"):
        token_logprobs(torch.tensor(1.0), torch.tensor(0))


def test_rejects_tensors_on_different_devices():
    with pytest.raises(ValueError, match="targets must be on the same device as logits"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long, device="meta"))


def test_reference_entropy_is_finite_with_minus_inf_logits():
    """A padded vocabulary (-inf logits) has a finite entropy, and so does its gradient."""
    x = torch.randn(2, 6, dtype=torch.float64)
    x[:, 4:] = float("-inf")
    x.requires_grad_()
    _, h = reference.token_logprobs(x, torch.tensor([0, 1]), return_entropy=True)
    _, h_kept = reference.token_logprobs(x.detach()[:, :4], torch.tensor([0, 1]), return_entropy=True)
    torch.testing.assert_close(h, h_kept)
    h.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 4:] == 0).all()
    _, ours = token_logprobs(x.detach().float(), torch.tensor([0, 1]), return_entropy=True)
    torch.testing.assert_close(ours.double(), h.detach(), rtol=2e-6, atol=2e-6)


def extreme_logits(scale, dtype, V=5000):
    """(4, V) logits at |x| ~ scale: spread rows, a row of near-ties (1e7-sized logits one apart, where
    the softmax is not one-hot), a row all at one huge value, V > one CPU chunk (2048)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, V, generator=g, dtype=torch.float64) * scale
    x[1] = -scale + torch.randint(0, 4, (V,), generator=g)  # exact in float32 up to scale 2^24
    x[2] = scale  # V equal logits: uniform, entropy log V
    x[3, ::7] = float("-inf")  # a padded vocabulary among huge logits
    x = x.to(dtype)
    t = torch.tensor([int(x[0].argmax()), 17, 4999, 3])  # the argmax: log p == -log(#ties) ~ 0
    return x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1e4, 1e9, 1e30])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits_stay_in_range_and_match_reference(dtype, scale, temperature):
    """Issue 22: at logits ~1e9 the AVX2 kernel gave +inf log-probs and NaN entropies (float pivots
    times the temperature scale were off by up to 256 in base-2 exponents). log_softmax stays finite
    there, and so must we: log p <= 0, H >= 0, both finite, gradients finite and right."""
    x, t = extreme_logits(scale, dtype)
    if dtype == torch.bfloat16:
        x[1] = (-1e4 + torch.randint(0, 4, (x.shape[1],)) * 32).to(dtype)  # bf16's spacing at 1e4 is 64
    lp, h = token_logprobs(x, t, temperature=temperature, return_entropy=True)
    assert torch.isfinite(lp).all() and (lp <= 0).all(), lp
    assert torch.isfinite(h).all() and (h >= 0).all(), h
    ref_lp, ref_h = ref64(x, t, temperature)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(lp.double(), ref_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(h.double(), ref_h, rtol=tol, atol=tol)
    g_lp, g_h = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    d = grads(token_logprobs, x, t, g_lp, g_h, temperature=temperature)
    ref_d = grads(reference.token_logprobs, x.double(), t, g_lp, g_h, temperature=temperature)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d.double(), ref_d, rtol=tol, atol=10 * tol)
