import pytest
import torch
import torch.nn.functional as F
from fastrlhf.ops import linear_cross_entropy, reference

IGN = -100


def make(N, C, V, dtype=torch.float64, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)  # (N, C)
    w = (torch.randn(V, C, generator=g, dtype=torch.float64) * 0.5).to(dtype)  # (V, C)
    t = torch.randint(0, V, (N,), generator=g)  # (N,)
    t[list(ignored)] = IGN
    return h, w, t


def loss_and_grads(fn, h, w, t, **kw):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, t, **kw)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("N,C,V", [(1, 3, 2), (97, 59, 101), (40, 16, 4100)])
@pytest.mark.parametrize("chunk_rows", [1, 7, 512])
@pytest.mark.parametrize("ignored", [(), (0, 5, -1)])
def test_float64_matches_reference(N, C, V, chunk_rows, ignored):
    if N == 1 and ignored:
        ignored = ()
    h, w, t = make(N, C, V, ignored=ignored)
    got = loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=chunk_rows)
    want = loss_and_grads(reference.linear_cross_entropy, h, w, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_reference():
    h, w, t = make(300, 64, 50257, torch.float32, ignored=(9, 255))
    got = loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=128)
    want = loss_and_grads(reference.linear_cross_entropy, h.double(), w.double(), t)
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close([g.double() for g in got], want, rtol=1e-5, atol=1e-8)


def test_leading_dims_and_upstream_gradient_scale():
    h, w, t = make(12, 5, 9)
    h3, t3 = h.view(3, 4, 5), t.view(3, 4)  # (B, T, C), (B, T)
    x = h3.clone().requires_grad_()
    (2.5 * linear_cross_entropy(x, w, t3)).backward()
    xr = h3.clone().requires_grad_()
    (2.5 * F.cross_entropy(xr.reshape(-1, 5) @ w.t(), t)).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-14)


def test_unit_seed_fast_path_survives_retain_graph_and_tied_weights():
    # loss.backward() returns the saved gradients unscaled; a second backward through the same graph and
    # a tied embedding (whose gradient autograd adds to the head's) must still see them intact
    h, w, t = make(10, 4, 7)
    idx = torch.randint(0, 7, (10,))

    def run(fn):  # (V, C) weight used as embedding and head, like GPT's wte
        wt = w.clone().requires_grad_()
        loss = fn(F.embedding(idx, wt) + h, wt, t)
        grads = []
        for scale in (1.0, 1.0, 3.0):
            (loss if scale == 1.0 else scale * loss).backward(retain_graph=True)
            grads.append(wt.grad)
            wt.grad = None
        return grads

    got, want = run(linear_cross_entropy), run(reference.linear_cross_entropy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], 3.0 * got[0], rtol=1e-12, atol=1e-14)


def test_gradcheck():
    h, w, t = make(6, 4, 7, ignored=(2,))
    h, w = h.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, chunk_rows=4), (h, w))


def test_no_kept_target_is_nan_with_zero_gradients_like_cross_entropy():
    h, w, t = make(4, 3, 5, ignored=range(4))
    loss, dh, dw = loss_and_grads(linear_cross_entropy, h, w, t)
    assert loss.isnan() and F.cross_entropy(h @ w.t(), t).isnan()
    assert not dh.any() and not dw.any()


def test_no_grad_gives_the_same_loss():
    h, w, t = make(50, 8, 33, ignored=(3,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    torch.testing.assert_close(loss, reference.linear_cross_entropy(h, w, t), rtol=1e-12, atol=1e-12)


def test_thread_count_does_not_change_the_result():
    h, w, t = make(64, 32, 999)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=16)
        torch.set_num_threads(2)
        two = loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=16)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-14)  # float64: GEMM order only


def test_bfloat16_takes_the_unfused_path():
    h, w, t = make(10, 8, 20, torch.bfloat16)
    got = loss_and_grads(linear_cross_entropy, h, w, t)
    want = loss_and_grads(reference.linear_cross_entropy, h, w, t)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_opcheck():
    h, w, t = make(9, 5, 11, torch.float32, ignored=(4,))
    h, w = h.requires_grad_(), w.requires_grad_()
    torch.library.opcheck(torch.ops.fastrlhf.linear_cross_entropy_fwd.default, (h, w, t, IGN, True, 4))
    torch.library.opcheck(
        torch.ops.fastrlhf.linear_cross_entropy_fwd.default, (h.detach(), w.detach(), t, IGN, False, 4)
    )
    logits = torch.randn(3, 7)
    torch.library.opcheck(
        torch.ops.fastrlhf.token_logprobs_grad_.default, (logits, torch.tensor([0, 6, 2]), -0.5)
    )


def test_in_place_kernel_writes_scaled_gradient_of_logprob():
    logits = torch.randn(4, 4100, dtype=torch.float64)
    t = torch.tensor([0, 4099, 7, 2048])
    x = logits.clone().requires_grad_()
    lp = torch.log_softmax(x, -1).gather(1, t[:, None]).squeeze(1)
    (-0.25 * lp.sum()).backward()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        buf = logits.to(dtype, copy=True)  # overwritten in place
        got = torch.ops.fastrlhf.token_logprobs_grad_(buf, t, -0.25)
        torch.testing.assert_close(got.double(), lp.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(buf.double(), x.grad, rtol=tol, atol=tol)


def test_compile_fullgraph():
    h, w, t = make(8, 4, 6, torch.float32)
    f = torch.compile(lambda a, b: linear_cross_entropy(a, b, t) * 2, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(lambda a, b, _: f(a, b), h, w, t)
    want = loss_and_grads(lambda a, b, tt: 2 * reference.linear_cross_entropy(a, b, tt), h, w, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 11])
def test_target_out_of_range(bad):
    h, w, t = make(9, 4, 11, torch.float32, ignored=(0,))
    t[7] = bad  # named by its position in the caller's targets, past the dropped row and the first chunk
    with pytest.raises(
        ValueError, match=rf"targets must be in \[0, V\) = \[0, 11\); got {bad} at position \(7\)"
    ):
        linear_cross_entropy(h, w, t, chunk_rows=2)


def test_bad_shapes_and_dtypes():
    h, w, t = make(3, 4, 11, torch.float32)
    with pytest.raises(
        ValueError, match=r"hidden must be \(N, C\) and weight \(V, C\); got \(3, 4\) and \(11, 5\)"
    ):
        linear_cross_entropy(h, torch.zeros(11, 5), t)
    with pytest.raises(
        ValueError, match=r"targets must have the shape of hidden.shape\[:-1\] \(3,\); got \(4,\)"
    ):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \(N,\) = \(3,\) int64; got \(3,\) torch.int32"):
        linear_cross_entropy(h, w, t.int())
    with pytest.raises(ValueError, match="chunk_rows must be >= 1; got 0"):
        linear_cross_entropy(h, w, t, chunk_rows=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_kernel_with_minus_inf_logits(dtype):
    logits = torch.randn(3, 5000, dtype=torch.float64) * 4
    logits[0, :2048] = float("-inf")  # a whole first chunk masked (a padded vocabulary)
    logits[1, 4990:] = float("-inf")
    logits[2, ::3] = float("-inf")
    t = torch.tensor([3000, 7, 4])
    x = logits.clone().requires_grad_()
    lp = torch.log_softmax(x, -1).gather(1, t[:, None]).squeeze(1)
    (0.5 * lp.sum()).backward()
    buf = logits.to(dtype, copy=True)
    got = torch.ops.fastrlhf.token_logprobs_grad_(buf, t, 0.5)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), lp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(buf.double(), x.grad, rtol=tol, atol=tol)


def test_a_frozen_weight_gets_no_gradient_and_hidden_the_same_one():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 16, dtype=torch.float64)  # frozen, as LoRA's base or a tied frozen embedding
    t = torch.randint(0, 53, (37,))
    linear_cross_entropy(h, w, t, chunk_rows=8).backward()
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.t(), t), h)[0]
    torch.testing.assert_close(h.grad, want)
    assert w.grad is None


@pytest.mark.parametrize("scale", [1e5, 1e10, 1e15])
@pytest.mark.parametrize("with_grad", [True, False])
def test_huge_inputs_stay_finite_and_match_reference(scale, with_grad):
    """Issue 22: hidden ~1e10 gave a NaN loss and NaN gradients (the in-place kernel's float pivot times
    log2(e) was off by hundreds in the exponent). Cross-entropy there is large but finite."""
    h, w, t = make(37, 16, 4100, torch.float32, ignored=(3,))
    h = h * scale
    if with_grad:
        got = loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=16)
        want = loss_and_grads(reference.linear_cross_entropy, h.double(), w.double(), t)
    else:
        with torch.no_grad():
            got = (linear_cross_entropy(h, w, t, chunk_rows=16),)
        want = (reference.linear_cross_entropy(h.double(), w.double(), t),)
    assert all(torch.isfinite(g).all() for g in got)
    # the logits' own float32 rounding (2^-24 of |h @ w.T|) bounds how well the loss can be known
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


@pytest.mark.parametrize("dt_h,dt_w", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                       (torch.bfloat16, torch.float32)])  # fmt: skip
def test_mixed_dtypes_raise_value_error_naming_both(dt_h, dt_w):
    """Issue 22: a mix used to reach torch's matmul and raise its RuntimeError."""
    h, w, t = make(3, 4, 11)
    short = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}
    with pytest.raises(
        ValueError,
        match=rf"hidden and weight must have the same dtype; got hidden torch.{short[dt_h]}, "
        rf"weight torch.{short[dt_w]}",
    ):
        linear_cross_entropy(h.to(dt_h), w.to(dt_w), t)


def test_plain_path_with_no_kept_target_is_nan_with_zero_gradients():
    """Found by tests/ops/test_fuzz.py: the unfused path (bf16, CUDA) divided by zero kept targets, which
    made NaN gradients; F.cross_entropy (and the fused path) give a NaN loss and zero gradients."""
    h, w, t = make(3, 4, 5, torch.bfloat16, ignored=(0, 1, 2))
    loss, d_h, d_w = loss_and_grads(linear_cross_entropy, h, w, t)
    assert torch.isnan(loss)
    assert (d_h == 0).all() and (d_w == 0).all()
