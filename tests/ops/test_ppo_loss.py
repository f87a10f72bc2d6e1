import fastrlhf
import pytest
import torch
from fastrlhf.ops import ppo_loss, reference
from fastrlhf.ops.reference import PPO_STATS

NAMES = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns")
DIFF = ("logprobs", "values", "entropy")


def make(B, T, dtype=torch.float32, holes=True):
    """Inputs as PPO sees them: ratios near 1, some clipped; a full row, an empty row, a holey mask."""
    g = {n: torch.randn(B, T, dtype=torch.float64) for n in NAMES}
    g["old_logprobs"] = g["logprobs"] + 0.3 * torch.randn(B, T, dtype=torch.float64)
    g["old_values"] = g["values"] + 0.3 * torch.randn(B, T, dtype=torch.float64)
    g["entropy"] = torch.rand(B, T, dtype=torch.float64) * 3
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T
    if B > 2:
        lengths[1] = 0
    mask = torch.arange(T) < lengths[:, None]
    if holes and T > 3:
        mask[0, 1] = False
    g = {k: v.to(dtype) for k, v in g.items()}
    return g, mask


def run(fn, g, mask, entropy=True, **kw):
    """loss, stats and d loss / d (logprobs, values, entropy) for leaf copies of g."""
    leaves = {k: v.detach().clone().requires_grad_(k in DIFF) for k, v in g.items()}
    loss, stats = fn(*(leaves[n] for n in NAMES), mask, entropy=leaves["entropy"] if entropy else None, **kw)
    loss.backward()
    return loss, stats, {k: leaves[k].grad for k in DIFF}


def as64(g):
    return {k: v.double() for k, v in g.items()}


KW = {"clip_range": 0.2, "clip_range_value": 0.2, "vf_coef": 0.1, "ent_coef": 0.01}


def check_against_reference(g, mask, entropy=True, rtol=2e-6, atol=1e-7, **kw):
    kw = {**KW, **kw}
    loss, stats, grads = run(ppo_loss, g, mask, entropy, **kw)
    ref_loss, ref_stats, ref_grads = run(reference.ppo_loss, as64(g), mask, entropy, **kw)
    assert loss.dtype == g["logprobs"].dtype and loss.shape == ()
    assert list(stats) == list(PPO_STATS) and all(s.shape == () for s in stats.values())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for k in PPO_STATS:
        torch.testing.assert_close(stats[k].double(), ref_stats[k], rtol=rtol, atol=atol, msg=k)
    for k in DIFF:
        if not entropy and k == "entropy":
            assert grads[k] is None
            continue
        assert grads[k].dtype == g[k].dtype
        torch.testing.assert_close(grads[k].double(), ref_grads[k], rtol=rtol, atol=atol * 1e-3, msg=k)


def test_extension_is_loaded():
    assert fastrlhf.HAS_EXT, "the tests must exercise the compiled ops, not the fallback"


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 97), (64, 512)])
@pytest.mark.parametrize("entropy", [True, False])
def test_float32_matches_float64_reference(B, T, entropy):
    g, mask = make(B, T)
    check_against_reference(g, mask, entropy)


def test_float64_matches_reference_to_rounding():
    g, mask = make(7, 131, torch.float64)
    check_against_reference(g, mask, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kw",
    [
        {"clip_range": 0.05, "clip_range_value": 0.5, "vf_coef": 1.0, "ent_coef": 0.0},
        {"clip_range": 1.5, "clip_range_value": 0.01, "vf_coef": 0.0, "ent_coef": 0.3},
    ],
)
def test_other_coefficients(kw):
    g, mask = make(4, 50)
    check_against_reference(g, mask, **kw)


def test_float_mask_weights_with_holes():
    g, mask = make(6, 41)
    weights = mask * torch.rand(6, 41)  # float weights: a weighted token mean, as the reference
    check_against_reference(g, weights)


def test_all_masked_gives_zeros():
    g, _ = make(3, 9)
    loss, stats, grads = run(ppo_loss, g, torch.zeros(3, 9, dtype=torch.bool), ent_coef=0.1)
    assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats.values())
    assert all((d == 0).all() for d in grads.values())


def test_first_minibatch_ratio_is_one_and_ties_match_autograd():
    """logprobs == old_logprobs (ratio 1: both surrogate terms tie) and values == old_values."""
    g, mask = make(4, 33)
    g["old_logprobs"] = g["logprobs"].clone()
    g["old_values"] = g["values"].clone()
    _loss, stats, _ = run(ppo_loss, g, mask)
    assert stats["ratio_mean"].item() == 1.0 and stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    check_against_reference(g, mask)


def test_value_tie_outside_clip_range_splits_gradient_like_torch_maximum():
    # v - R = 1 and v_c - R = -1: equal squared errors, v outside the clip range
    one = torch.ones(1, 2, dtype=torch.float64)
    g = {
        "logprobs": 0 * one,
        "old_logprobs": 0 * one,
        "advantages": one,
        "values": one,
        "old_values": -1.25 * one,
        "returns": 0 * one,
        "entropy": one,
    }
    check_against_reference(g, torch.ones(1, 2, dtype=torch.bool), clip_range_value=0.25, rtol=0, atol=0)


def test_gradcheck():
    g, mask = make(3, 11, torch.float64)
    weights = mask * torch.rand(3, 11, dtype=torch.float64)
    for m in (mask, weights):

        def f(lp, v, ent, m=m):
            loss, _ = ppo_loss(
                lp,
                g["old_logprobs"],
                g["advantages"],
                v,
                g["old_values"],
                g["returns"],
                m,
                entropy=ent,
                ent_coef=0.05,
                vf_coef=0.5,
            )
            return loss

        inputs = tuple(g[k].clone().requires_grad_() for k in DIFF)
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_within_twice_pytorch_error(dtype):
    g, mask = make(16, 200, dtype)
    loss, stats, grads = run(ppo_loss, g, mask, **KW)
    ref_loss, ref_stats, ref_grads = run(reference.ppo_loss, as64(g), mask, **KW)
    # PyTorch's own error: the same formula evaluated in the dtype
    native = {k: v.detach().clone().requires_grad_(k in DIFF) for k, v in g.items()}
    m = mask.to(dtype)
    n = m.sum()
    ratio = torch.exp(native["logprobs"] - native["old_logprobs"])
    adv = native["advantages"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    vc = native["old_values"] + (native["values"] - native["old_values"]).clamp(-0.2, 0.2)
    vl = torch.maximum((native["values"] - native["returns"]) ** 2, (vc - native["returns"]) ** 2)
    t_loss = (pg * m).sum() / n + 0.1 * 0.5 * (vl * m).sum() / n - 0.01 * (native["entropy"] * m).sum() / n
    t_loss.backward()
    assert loss.dtype == dtype and stats["pg_loss"].dtype == torch.float32
    assert (loss.double() - ref_loss).abs() <= 2 * (t_loss.double() - ref_loss).abs() + 1e-12
    for k in DIFF:
        assert grads[k].dtype == dtype
        err = (grads[k].double() - ref_grads[k]).abs().max()
        assert err <= 2 * (native[k].grad.double() - ref_grads[k]).abs().max(), k
    for k in PPO_STATS:  # fp32 math on the rounded inputs
        torch.testing.assert_close(stats[k].double(), ref_stats[k], rtol=2e-6, atol=1e-7, msg=k)


def test_mixed_float_dtypes_follow_the_reference():
    g, mask = make(4, 30)
    g["values"] = g["values"].double()  # float64 values with float32 logprobs: computed in float32
    loss, stats, grads = run(ppo_loss, g, mask, **KW)
    ref_loss, _ref_stats, _ = run(reference.ppo_loss, g, mask, **KW)
    assert loss.dtype == torch.float32 and stats["v_loss"].dtype == torch.float32
    assert grads["values"].dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-7)


def test_noncontiguous_inputs():
    g, mask = make(8, 20)
    strided = {k: v.t().contiguous().t() for k, v in g.items()}  # same values, column-major
    a = run(ppo_loss, g, mask, **KW)
    b = run(ppo_loss, strided, mask.t().contiguous().t(), **KW)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_independent_of_thread_count():
    g, mask = make(64, 997)
    weights = mask * torch.rand(64, 997)  # float weights: sums that depend on the order
    old = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(run(ppo_loss, g, weights, **KW))
    finally:
        torch.set_num_threads(old)
    (l1, s1, g1), (l2, s2, g2) = runs
    assert torch.equal(l1, l2) and all(torch.equal(s1[k], s2[k]) for k in PPO_STATS)
    assert all(torch.equal(g1[k], g2[k]) for k in DIFF)


@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("need_grads", [True, False])
def test_opcheck(entropy, need_grads):
    g, mask = make(3, 10)
    args = [g[n].clone().requires_grad_(n in DIFF and need_grads) for n in NAMES]
    ent = g["entropy"].clone().requires_grad_(need_grads) if entropy else None
    coefs = (0.2, 0.3, 0.1, 0.01, need_grads)
    torch.library.opcheck(torch.ops.fastrlhf.ppo_loss_fwd.default, (*args, mask, ent, *coefs))
    torch.library.opcheck(torch.ops.fastrlhf.ppo_loss_fwd.default, (*args, mask.float(), ent, *coefs))


def test_raw_op_gradients_are_the_unit_upstream_gradients():
    """grads (K, B, T) of the raw op == d loss / d (logprobs, values, entropy); (0,) when not asked."""
    g, mask = make(5, 37)
    coefs = (0.2, 0.2, 0.1, 0.01)
    _, _, grads = torch.ops.fastrlhf.ppo_loss_fwd(*(g[n] for n in NAMES), mask, g["entropy"], *coefs, True)
    _, _, ref_grads = run(reference.ppo_loss, as64(g), mask, **KW)
    assert grads.shape == (3, 5, 37) and grads.dtype == torch.float32
    for row, k in zip(grads, DIFF):
        torch.testing.assert_close(row.double(), ref_grads[k], rtol=2e-6, atol=1e-10, msg=k)
    _, _, none = torch.ops.fastrlhf.ppo_loss_fwd(*(g[n] for n in NAMES), mask, None, *coefs, False)
    assert none.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_backward_op(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grads = torch.randn(3, 4, 9, dtype=acc)
    torch.library.opcheck(torch.ops.fastrlhf.ppo_loss_bwd.default, (grads, torch.tensor(-1.5, dtype=dtype)))
    out = torch.ops.fastrlhf.ppo_loss_bwd(grads, torch.tensor(-1.5, dtype=dtype))
    assert out.dtype == dtype and torch.equal(out, (grads * -1.5).to(dtype))


def test_raw_op_without_grads_refuses_backward():
    g, mask = make(2, 5)
    lp = g["logprobs"].clone().requires_grad_()
    others = (g[n] for n in NAMES[1:])
    loss, _, _ = torch.ops.fastrlhf.ppo_loss_fwd(lp, *others, mask, None, 0.2, 0.2, 0.1, 0.0, False)
    with pytest.raises(RuntimeError, match="need_grads=False"):
        loss.backward()


def test_no_grad_and_grad_calls_agree():
    g, mask = make(6, 50)
    with torch.no_grad():
        loss0, stats0 = ppo_loss(*(g[n] for n in NAMES), mask, entropy=g["entropy"], **KW)
    loss1, stats1, _ = run(ppo_loss, g, mask, **KW)
    assert torch.equal(loss0, loss1.detach()) and all(torch.equal(stats0[k], stats1[k]) for k in PPO_STATS)


def test_upstream_gradient_scales_the_gradients():
    g, mask = make(4, 21)
    leaves = {k: v.clone().requires_grad_(k in DIFF) for k, v in g.items()}
    loss, _ = ppo_loss(*(leaves[n] for n in NAMES), mask, entropy=leaves["entropy"], **KW)
    (-2.5 * loss).backward()
    _, _, ref = run(reference.ppo_loss, as64(g), mask, **KW)
    for k in DIFF:
        torch.testing.assert_close(leaves[k].grad.double(), -2.5 * ref[k], rtol=2e-6, atol=1e-10, msg=k)


def test_retained_graph_gives_fresh_gradients_each_backward():
    """The first backward may hand out the kernel's own buffer; changing it in place must not leak
    into a second backward through the retained graph."""
    g, mask = make(4, 21)
    leaves = {k: v.clone().requires_grad_(k in DIFF) for k, v in g.items()}
    loss, _ = ppo_loss(*(leaves[n] for n in NAMES), mask, entropy=leaves["entropy"], **KW)
    loss.backward(retain_graph=True)
    first = {k: leaves[k].grad.clone() for k in DIFF}
    for k in DIFF:
        leaves[k].grad.mul_(-7.0)  # in place on what the first backward returned
        leaves[k].grad = None
    loss.backward()
    for k in DIFF:
        assert torch.equal(leaves[k].grad, first[k]), k


def test_double_backward_is_refused():
    """First derivatives only: a second backward raises instead of returning zeros."""
    g, mask = make(2, 5)
    lp = g["logprobs"].clone().requires_grad_()
    loss, _ = ppo_loss(lp, *(g[n] for n in NAMES[1:]), mask)
    (d_lp,) = torch.autograd.grad(loss, lp, create_graph=True)
    assert d_lp.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        d_lp.sum().backward()


def test_compile_fullgraph():
    g, mask = make(4, 13)

    def f(lp, olp, adv, v, ov, ret, m, ent):
        loss, stats = ppo_loss(lp, olp, adv, v, ov, ret, m, entropy=ent, ent_coef=0.01)
        return loss, stats["clipfrac"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(k in DIFF) for k, v in g.items()}
    loss, clipfrac = compiled(*(leaves[n] for n in NAMES), mask, leaves["entropy"])
    loss.backward()
    ref_loss, ref_stats, ref_grads = run(ppo_loss, g, mask, ent_coef=0.01)
    torch.testing.assert_close((loss, clipfrac), (ref_loss, ref_stats["clipfrac"]))
    for k in DIFF:
        torch.testing.assert_close(leaves[k].grad, ref_grads[k])


# ---- bad input: one test per case -------------------------------------------------------------
def args(B=2, T=3, **over):
    g = {n: torch.randn(B, T) for n in NAMES}
    g["mask"] = torch.ones(B, T, dtype=torch.bool)
    g.update(over)
    return [g[n] for n in (*NAMES, "mask")]


def test_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"logprobs must be \(B, T\); got shape \(2, 3, 4\)"):
        ppo_loss(
            *args(**{n: torch.randn(2, 3, 4) for n in NAMES}, mask=torch.ones(2, 3, 4, dtype=torch.bool))
        )


@pytest.mark.parametrize("name", NAMES[1:])
def test_rejects_mismatched_shape(name):
    with pytest.raises(ValueError, match=rf"{name} must have the shape of logprobs \(2, 3\); got \(3, 2\)"):
        ppo_loss(*args(**{name: torch.randn(3, 2)}))


def test_rejects_mismatched_mask_shape():
    with pytest.raises(ValueError, match=r"mask must have the shape of logprobs \(2, 3\); got \(2, 4\)"):
        ppo_loss(*args(mask=torch.ones(2, 4, dtype=torch.bool)))


def test_rejects_mismatched_entropy_shape():
    with pytest.raises(ValueError, match=r"entropy must have the shape of logprobs \(2, 3\); got \(2\)"):
        ppo_loss(*args(), entropy=torch.randn(2))


def test_rejects_integer_logprobs():
    with pytest.raises(ValueError, match="logprobs must be float32, float64, bfloat16 or float16; got int64"):
        ppo_loss(*args(logprobs=torch.ones(2, 3, dtype=torch.long)))


def test_rejects_integer_advantages():
    with pytest.raises(
        ValueError, match="advantages must be float32, float64, bfloat16 or float16; got int32"
    ):
        ppo_loss(*args(advantages=torch.ones(2, 3, dtype=torch.int32)))


def test_rejects_integer_mask():
    with pytest.raises(
        ValueError, match=r"mask must be bool or have the dtype of logprobs \(float32\); got int64"
    ):
        ppo_loss(*args(mask=torch.ones(2, 3, dtype=torch.long)))


@pytest.mark.parametrize("name", ["clip_range", "clip_range_value"])
def test_rejects_nonpositive_clip_range(name):
    with pytest.raises(ValueError, match=f"{name} must be > 0; got 0"):
        ppo_loss(*args(), **{name: 0.0})


@pytest.mark.parametrize("name", ["vf_coef", "ent_coef"])
def test_rejects_negative_coef(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0; got -0.5"):
        ppo_loss(*args(), **{name: -0.5})


def test_rejects_tensors_on_different_devices():
    with pytest.raises(ValueError, match="returns must be on the same device as logprobs"):
        ppo_loss(*args(returns=torch.randn(2, 3, device="meta")))


def test_baseline_isa_path_matches(tmp_path):
    """FASTRLHF_CPU_PATH=base (a fresh process) runs the portable kernels; they agree with this one's."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch, fastrlhf\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_ppo_loss import KW, make, run\n"
        "from fastrlhf.ops import ppo_loss\n"
        "torch.manual_seed(0)\n"
        "g, mask = make(5, 203)\n"
        "loss, stats, grads = run(ppo_loss, g, mask * torch.rand(5, 203), **KW)\n"
        "torch.save((fastrlhf.build_info()['cpu_path'], loss, stats, grads), sys.argv[1])\n"
    )
    out, here = tmp_path / "base.pt", os.path.dirname(os.path.abspath(__file__))
    subprocess.run(
        [sys.executable, "-c", script, str(out), here],
        check=True,
        env={**os.environ, "FASTRLHF_CPU_PATH": "base"},
    )
    path, *base = torch.load(out)
    assert path == "base"
    torch.manual_seed(0)
    g, mask = make(5, 203)
    torch.testing.assert_close(
        base, list(run(ppo_loss, g, mask * torch.rand(5, 203), **KW)), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (3, 0)])
def test_empty_batch_with_entropy_has_gradients_for_all_three(shape):
    """Found by tests/ops/test_fuzz.py: with B * T = 0 the empty entropy tensor has no data pointer, and the
    adapter took that for 'no entropy': two gradient rows instead of three, and an IndexError in backward."""
    z = lambda: torch.zeros(shape, dtype=torch.float64)
    lp, v, ent = (z().requires_grad_() for _ in range(3))
    loss, _ = ppo_loss(lp, z(), z(), v, z(), z(), torch.zeros(shape, dtype=torch.bool), entropy=ent)
    grads = torch.autograd.grad(loss, (lp, v, ent))
    assert [g.shape for g in grads] == [torch.Size(shape)] * 3
