import os

import fastrlhf
import pytest
import torch
from fastrlhf.ops import policy_loss, reference
from fastrlhf.ops.reference import POLICY_AGGS, POLICY_STATS

DIFF = ("logprobs", "entropy")
CLIPS = [(0.2, 0.2), (0.2, 0.28), (0.0, 0.5)]  # symmetric, DAPO's clip-higher, no room below 1
KLS = ["off", "beta", "stat_only"]  # no reference; k3 in the loss (beta > 0); reference given, beta 0


def make(B, T, dtype=torch.float32, per_seq=False, holes=True):
    """Inputs as GRPO sees them: ratios near 1, some clipped; a full row, an empty row, a holey mask."""
    lp = -torch.rand(B, T, dtype=torch.float64) * 3
    g = {
        "logprobs": lp,
        "old_logprobs": lp + 0.3 * torch.randn(B, T, dtype=torch.float64),
        "ref_logprobs": lp + 0.5 * torch.randn(B, T, dtype=torch.float64),
        "advantages": torch.randn(B, dtype=torch.float64)
        if per_seq
        else torch.randn(B, T, dtype=torch.float64),
        "entropy": torch.rand(B, T, dtype=torch.float64) * 3,
    }
    lengths = torch.randint(0, T + 1, (B,))
    lengths[:1] = T
    if B > 2:
        lengths[1] = 0
    mask = torch.arange(T) < lengths[:, None]
    if holes and T > 3 and B > 0:
        mask[0, 1] = False
    return {k: v.to(dtype) for k, v in g.items()}, mask


def kl_kw(kl, beta=0.04):
    return {"off": {}, "beta": {"beta": beta}, "stat_only": {}}[kl]


def run(fn, g, mask, kl="beta", entropy=True, **kw):
    """loss, stats and d loss / d (logprobs, entropy) for leaf copies of g (zeros where no gradient flows)."""
    leaves = {k: v.detach().clone().requires_grad_(k in DIFF) for k, v in g.items()}
    loss, stats = fn(
        leaves["logprobs"], leaves["old_logprobs"], leaves["advantages"], mask,
        ref_logprobs=None if kl == "off" else leaves["ref_logprobs"],
        entropy=leaves["entropy"] if entropy else None, **kl_kw(kl), **kw,
    )  # fmt: skip
    loss.backward()
    grads = {k: leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k]) for k in DIFF}
    return loss, stats, grads


def as64(g):
    return {k: v.double() for k, v in g.items()}


def check_against_reference(g, mask, kl="beta", entropy=True, rtol=2e-6, atol=1e-7, **kw):
    kw.setdefault("ent_coef", 0.01)
    loss, stats, grads = run(policy_loss, g, mask, kl, entropy, **kw)
    ref_loss, ref_stats, ref_grads = run(reference.policy_loss, as64(g), mask, kl, entropy, **kw)
    assert loss.dtype == g["logprobs"].dtype and loss.shape == ()
    assert list(stats) == list(POLICY_STATS) and all(s.shape == () for s in stats.values())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for k in POLICY_STATS:
        torch.testing.assert_close(stats[k].double(), ref_stats[k], rtol=rtol, atol=atol, msg=k)
    for k in DIFF:
        assert grads[k].dtype == g[k].dtype
        torch.testing.assert_close(grads[k].double(), ref_grads[k], rtol=rtol, atol=atol * 1e-3, msg=k)
    return loss, stats, grads


def test_extension_is_loaded():
    assert fastrlhf.HAS_EXT, "the tests must exercise the compiled ops, not the fallback"


@pytest.mark.parametrize("agg", POLICY_AGGS)
@pytest.mark.parametrize("eps", CLIPS)
@pytest.mark.parametrize("kl", KLS)
def test_float64_matches_reference(agg, eps, kl):
    g, mask = make(7, 131, torch.float64)
    _, stats, _ = check_against_reference(
        g, mask, kl, agg=agg, eps_low=eps[0], eps_high=eps[1], rtol=1e-12, atol=1e-14
    )
    assert (stats["kl"] > 0) == (kl != "off")
    assert stats["clipfrac_low"] > 0 and stats["clipfrac_high"] > 0  # both sides exercised


@pytest.mark.parametrize("agg", POLICY_AGGS)
@pytest.mark.parametrize("per_seq", [False, True])
def test_per_sequence_advantages_match_reference_and_broadcast(agg, per_seq):
    g, mask = make(6, 45, torch.float64, per_seq=per_seq)
    loss, stats, grads = check_against_reference(g, mask, agg=agg, rtol=1e-12, atol=1e-14)
    if per_seq:  # the same as the (B, T) advantages it broadcasts to
        wide = {**g, "advantages": g["advantages"][:, None].expand(6, 45).contiguous()}
        loss2, stats2, grads2 = run(policy_loss, wide, mask, agg=agg, ent_coef=0.01)
        torch.testing.assert_close((loss, stats, grads), (loss2, stats2, grads2), rtol=0, atol=0)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 97), (3, 7), (5, 97), (64, 512)])
@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_float32_matches_float64_reference(B, T, agg):
    g, mask = make(B, T)
    check_against_reference(g, mask, agg=agg)
    check_against_reference(g, mask, "off", entropy=False, agg=agg)


def test_max_len_is_the_dr_grpo_divisor():
    g, mask = make(5, 40, torch.float64)
    kw = {"agg": "seq_mean_token_sum_norm"}
    check_against_reference(g, mask, max_len=256, rtol=1e-12, atol=1e-14, **kw)
    default, _, _ = run(policy_loss, g, mask, **kw)
    explicit, _, _ = run(policy_loss, g, mask, max_len=40, **kw)
    halved, _, _ = run(policy_loss, g, mask, max_len=80, **kw)
    assert torch.equal(default, explicit)  # max_len defaults to T
    torch.testing.assert_close(halved, default / 2, rtol=1e-14, atol=0)


def test_aggregations_by_hand():
    """r = 1 everywhere, so l = -A: rows of 1 and 3 tokens, a third row empty."""
    adv = torch.tensor([[1.0, 9, 9, 9], [2.0, 3.0, 4.0, 9], [9, 9, 9, 9]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lp = torch.zeros(3, 4, dtype=torch.float64)
    want = {
        "token_mean": -(1 + 2 + 3 + 4) / 4,
        "seq_mean_token_mean": -(1 + (2 + 3 + 4) / 3) / 2,  # the empty row is not a sequence
        "seq_mean_token_sum_norm": -(1 / 4 + (2 + 3 + 4) / 4) / 2,
    }
    for agg, value in want.items():
        loss, stats = policy_loss(lp, lp, adv, mask, agg=agg)
        assert loss.item() == pytest.approx(value, rel=1e-15), agg
        assert stats["pg_loss"].item() == pytest.approx(-(1 + 2 + 3 + 4) / 4, rel=1e-15)  # a token mean


def test_clip_higher_lets_a_positive_advantage_ratio_grow():
    """DAPO: r = 1.25 with A > 0 is clipped (zero gradient) at eps_high 0.2 and not at 0.28; r = 0.75 with
    A < 0 is clipped below at eps_low 0.2 either way."""
    lp = torch.tensor([[1.25, 0.75]], dtype=torch.float64).log()
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for eps_high, clipped_high in ((0.2, True), (0.28, False)):
        x = lp.clone().requires_grad_()
        loss, stats = policy_loss(x, torch.zeros_like(lp), adv, mask, eps_low=0.2, eps_high=eps_high)
        loss.backward()
        want_grad = [0.0 if clipped_high else -1.25 / 2, 0.0]  # d(-A r)/d logp = -A r, token mean over 2
        torch.testing.assert_close(x.grad, torch.tensor([want_grad], dtype=torch.float64))
        assert stats["clipfrac_high"].item() == (0.5 if clipped_high else 0.0)
        assert stats["clipfrac_low"].item() == 0.5


def test_clip_is_counted_only_for_the_advantage_sign():
    """r far outside the range but with the other sign of A: not clipped, full gradient."""
    lp = torch.tensor([[2.0, 0.5]], dtype=torch.float64).log()
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    x = lp.clone().requires_grad_()
    loss, stats = policy_loss(x, torch.zeros_like(lp), adv, torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert stats["clipfrac_low"].item() == 0.0 and stats["clipfrac_high"].item() == 0.0
    torch.testing.assert_close(x.grad, torch.tensor([[2.0 / 2, -0.5 / 2]], dtype=torch.float64))


def test_float_mask_weights_with_holes():
    g, mask = make(6, 41)
    weights = mask * torch.rand(6, 41)  # float weights: weighted token means, as the reference
    for agg in POLICY_AGGS:
        check_against_reference(g, weights, agg=agg)


@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_all_masked_rows_add_nothing(agg):
    """Extra all-masked rows, holding garbage, change neither the loss nor the other rows' gradients."""
    g, mask = make(4, 23, torch.float64)
    junk, _ = make(3, 23, torch.float64)
    big = {k: torch.cat([g[k], 100 * junk[k]]) for k in g}
    big_mask = torch.cat([mask, torch.zeros(3, 23, dtype=torch.bool)])
    loss, stats, grads = run(policy_loss, g, mask, agg=agg, ent_coef=0.01)
    loss2, stats2, grads2 = run(policy_loss, big, big_mask, agg=agg, ent_coef=0.01)
    torch.testing.assert_close(loss2, loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(stats2, stats, rtol=1e-14, atol=0)
    for k in DIFF:
        torch.testing.assert_close(grads2[k][:4], grads[k], rtol=1e-14, atol=0)
        assert (grads2[k][4:] == 0).all()


@pytest.mark.parametrize("agg", POLICY_AGGS)
@pytest.mark.parametrize("B,T", [(3, 9), (0, 5), (2, 0)])
def test_fully_masked_batch_gives_zero_loss_and_gradients(agg, B, T):
    g, _ = make(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss, stats, grads = run(policy_loss, g, mask, agg=agg, ent_coef=0.1)
    assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats.values())
    assert all((d == 0).all() for d in grads.values())
    ref_loss, ref_stats, _ = run(reference.policy_loss, as64(g), mask, agg=agg, ent_coef=0.1)
    assert ref_loss.item() == 0.0 and all(s.item() == 0.0 for s in ref_stats.values())


@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_nan_logprob_gives_nan_loss(agg):
    """The trainers' non-finite guard relies on a NaN reaching the loss (not hidden by the clip's max)."""
    g, mask = make(3, 16)
    g["logprobs"][0, 0] = float("nan")
    loss, stats = policy_loss(g["logprobs"], g["old_logprobs"], g["advantages"], mask, agg=agg)
    assert loss.isnan() and stats["pg_loss"].isnan()
    ref_loss, _ = reference.policy_loss(g["logprobs"], g["old_logprobs"], g["advantages"], mask, agg=agg)
    assert ref_loss.isnan()


def test_first_minibatch_ratio_is_one_and_ties_match_autograd():
    """logprobs == old_logprobs: ratio 1, both surrogate terms tie; eps 0 puts r on the clamp's edges."""
    g, mask = make(4, 33)
    g["old_logprobs"] = g["logprobs"].clone()
    for eps in (0.2, 0.0):
        _, stats, _ = check_against_reference(g, mask, eps_low=eps, eps_high=eps)
        assert stats["ratio_mean"].item() == 1.0 and stats["approx_kl"].item() == 0.0
        assert stats["clipfrac_low"].item() == 0.0 and stats["clipfrac_high"].item() == 0.0


def test_gradcheck():
    g, mask = make(4, 11, torch.float64, holes=True)
    weights = mask * torch.rand(4, 11, dtype=torch.float64)
    for agg in POLICY_AGGS:
        for m in (mask, weights):

            def f(lp, ent, m=m, agg=agg):
                loss, _ = policy_loss(
                    lp, g["old_logprobs"], g["advantages"], m, eps_low=0.2, eps_high=0.28, agg=agg,
                    ref_logprobs=g["ref_logprobs"], beta=0.1, entropy=ent, ent_coef=0.05,
                )  # fmt: skip
                return loss

            inputs = tuple(g[k].clone().requires_grad_() for k in DIFF)
            assert torch.autograd.gradcheck(f, inputs), (agg, m.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_half_dtypes_within_twice_pytorch_error(dtype, agg):
    g, mask = make(16, 200, dtype)
    kw = {"agg": agg, "eps_low": 0.2, "eps_high": 0.28, "ent_coef": 0.01}  # run() sets beta 0.04
    loss, stats, grads = run(policy_loss, g, mask, **kw)
    ref_loss, ref_stats, ref_grads = run(reference.policy_loss, as64(g), mask, **kw)
    # PyTorch's own error: the same formula evaluated in the dtype
    x = {k: v.detach().clone().requires_grad_(k in DIFF) for k, v in g.items()}
    m = mask.to(dtype)
    ratio = torch.exp(x["logprobs"] - x["old_logprobs"])
    adv = x["advantages"]
    d = x["ref_logprobs"] - x["logprobs"]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv) + 0.04 * (torch.exp(d) - d - 1)
    per_token = (per_token - 0.01 * x["entropy"]) * m
    rows, live = m.sum(1), (mask.sum(1) > 0).sum()
    t_loss = {
        "token_mean": per_token.sum() / m.sum(),
        "seq_mean_token_mean": (per_token.sum(1) / rows.clamp(min=1)).sum() / live,
        "seq_mean_token_sum_norm": (per_token.sum(1) / 200).sum() / live,
    }[agg]
    t_loss.backward()
    assert loss.dtype == dtype and stats["pg_loss"].dtype == torch.float32
    assert (loss.double() - ref_loss).abs() <= 2 * (t_loss.double() - ref_loss).abs() + 1e-12
    for k in DIFF:
        assert grads[k].dtype == dtype
        err = (grads[k].double() - ref_grads[k]).abs().max()
        assert err <= 2 * (x[k].grad.double() - ref_grads[k]).abs().max(), k
    for k in POLICY_STATS:  # fp32 math on the rounded inputs
        torch.testing.assert_close(stats[k].double(), ref_stats[k], rtol=2e-6, atol=1e-7, msg=k)


def test_mixed_float_dtypes_follow_the_reference():
    g, mask = make(4, 30)
    g["advantages"] = g["advantages"].double()  # float64 advantages, float32 logprobs: computed in float32
    loss, stats, grads = run(policy_loss, g, mask, ent_coef=0.01)
    ref_loss, _, _ = run(reference.policy_loss, g, mask, ent_coef=0.01)
    assert loss.dtype == torch.float32 and stats["kl"].dtype == torch.float32
    assert grads["logprobs"].dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-7)


def test_noncontiguous_inputs():
    g, mask = make(8, 20)
    strided = {k: v.t().contiguous().t() for k, v in g.items()}  # same values, column-major
    kw = {"agg": "seq_mean_token_mean", "ent_coef": 0.01}
    a = run(policy_loss, g, mask, **kw)
    b = run(policy_loss, strided, mask.t().contiguous().t(), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_independent_of_thread_count():
    g, mask = make(64, 997)
    weights = mask * torch.rand(64, 997)  # float weights: sums that depend on the order
    old = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append([run(policy_loss, g, weights, agg=agg, ent_coef=0.01) for agg in POLICY_AGGS])
    finally:
        torch.set_num_threads(old)
    for (l1, s1, g1), (l2, s2, g2) in zip(*runs):
        assert torch.equal(l1, l2) and all(torch.equal(s1[k], s2[k]) for k in POLICY_STATS)
        assert all(torch.equal(g1[k], g2[k]) for k in DIFF)


def raw_args(g, mask, ref=True, entropy=True, need_grads=True, agg=1):
    """policy_loss_fwd's arguments, the differentiable tensors as leaves when need_grads."""
    lp = g["logprobs"].clone().requires_grad_(need_grads)
    ent = g["entropy"].clone().requires_grad_(need_grads) if entropy else None
    tensors = (lp, g["old_logprobs"], g["advantages"], mask, g["ref_logprobs"] if ref else None, ent)
    return (*tensors, 0.2, 0.28, agg, 0.04 if ref else 0.0, 13, 0.01, need_grads)


@pytest.mark.parametrize("ref", [True, False])
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("need_grads", [True, False])
def test_opcheck(ref, entropy, need_grads):
    g, mask = make(3, 10)
    op = torch.ops.fastrlhf.policy_loss_fwd.default
    torch.library.opcheck(op, raw_args(g, mask, ref, entropy, need_grads))
    torch.library.opcheck(op, raw_args(g, mask.float(), ref, entropy, need_grads, agg=2))
    g_seq, mask = make(3, 10, per_seq=True)
    torch.library.opcheck(op, raw_args(g_seq, mask, ref, entropy, need_grads, agg=0))


def test_raw_op_gradients_are_the_unit_upstream_gradients():
    """grads (K, B, T) of the raw op == d loss / d (logprobs, entropy); (0,) when not asked."""
    g, mask = make(5, 37)
    _, _, grads = torch.ops.fastrlhf.policy_loss_fwd(*raw_args(g, mask, need_grads=False)[:-1], True)
    kw = {"agg": "seq_mean_token_mean", "eps_high": 0.28, "ent_coef": 0.01}
    _, _, ref_grads = run(reference.policy_loss, as64(g), mask, **kw)
    assert grads.shape == (2, 5, 37) and grads.dtype == torch.float32
    for row, k in zip(grads, DIFF):
        torch.testing.assert_close(row.double(), ref_grads[k], rtol=2e-6, atol=1e-10, msg=k)
    _, _, none = torch.ops.fastrlhf.policy_loss_fwd(*raw_args(g, mask, need_grads=False))
    assert none.shape == (0,)
    _, _, only_lp = torch.ops.fastrlhf.policy_loss_fwd(
        *raw_args(g, mask, entropy=False, need_grads=False)[:-1], True
    )
    assert only_lp.shape == (1, 5, 37)


def test_raw_op_without_grads_refuses_backward():
    g, mask = make(2, 5)
    args = list(raw_args(g, mask, need_grads=False))
    args[0] = args[0].detach().requires_grad_()
    loss, _, _ = torch.ops.fastrlhf.policy_loss_fwd(*args)
    with pytest.raises(RuntimeError, match="need_grads=False"):
        loss.backward()


def test_no_grad_and_grad_calls_agree():
    g, mask = make(6, 50)
    with torch.no_grad():
        loss0, stats0 = policy_loss(g["logprobs"], g["old_logprobs"], g["advantages"], mask,
                                    ref_logprobs=g["ref_logprobs"], beta=0.04, entropy=g["entropy"], ent_coef=0.01)  # fmt: skip
    loss1, stats1, _ = run(policy_loss, g, mask, ent_coef=0.01)
    assert torch.equal(loss0, loss1.detach()) and all(torch.equal(stats0[k], stats1[k]) for k in POLICY_STATS)


def test_upstream_gradient_scales_the_gradients():
    g, mask = make(4, 21)
    leaves = {k: v.clone().requires_grad_(k in DIFF) for k, v in g.items()}
    loss, _ = policy_loss(leaves["logprobs"], g["old_logprobs"], g["advantages"], mask,
                          ref_logprobs=g["ref_logprobs"], beta=0.04, entropy=leaves["entropy"], ent_coef=0.01)  # fmt: skip
    (-2.5 * loss).backward()
    _, _, ref = run(reference.policy_loss, as64(g), mask, ent_coef=0.01)
    for k in DIFF:
        torch.testing.assert_close(leaves[k].grad.double(), -2.5 * ref[k], rtol=2e-6, atol=1e-10, msg=k)


def test_retained_graph_gives_fresh_gradients_each_backward():
    """The first backward may hand out the kernel's own buffer; changing it in place must not leak
    into a second backward through the retained graph."""
    g, mask = make(4, 21)
    lp = g["logprobs"].clone().requires_grad_()
    loss, _ = policy_loss(lp, g["old_logprobs"], g["advantages"], mask)
    loss.backward(retain_graph=True)
    first = lp.grad.clone()
    lp.grad.mul_(-7.0)  # in place on what the first backward returned
    lp.grad = None
    loss.backward()
    assert torch.equal(lp.grad, first)


def test_compile_fullgraph():
    g, mask = make(4, 13)

    def f(lp, olp, adv, m, ref, ent):
        loss, stats = policy_loss(lp, olp, adv, m, agg="seq_mean_token_mean", eps_high=0.28, ref_logprobs=ref,
                                  beta=0.04, entropy=ent, ent_coef=0.01)  # fmt: skip
        return loss, stats["clipfrac_high"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(k in DIFF) for k, v in g.items()}
    names = ("logprobs", "old_logprobs", "advantages")
    loss, clipfrac = compiled(*(leaves[n] for n in names), mask, leaves["ref_logprobs"], leaves["entropy"])
    loss.backward()
    ref_loss, ref_stats, ref_grads = run(
        policy_loss, g, mask, agg="seq_mean_token_mean", eps_high=0.28, ent_coef=0.01
    )
    torch.testing.assert_close((loss, clipfrac), (ref_loss, ref_stats["clipfrac_high"]))
    for k in DIFF:
        torch.testing.assert_close(leaves[k].grad, ref_grads[k])


# ---- bad input: one test per case -------------------------------------------------------------
def args(B=2, T=3, **over):
    g = {n: torch.randn(B, T) for n in ("logprobs", "old_logprobs", "advantages")}
    g["mask"] = torch.ones(B, T, dtype=torch.bool)
    g.update(over)
    return [g[n] for n in ("logprobs", "old_logprobs", "advantages", "mask")]


def test_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"logprobs must be \(B, T\); got shape \(2, 3, 4\)"):
        policy_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, 4) > 0)


@pytest.mark.parametrize("name", ["old_logprobs", "ref_logprobs", "entropy", "mask"])
def test_rejects_mismatched_shape(name):
    a = dict(zip(("logprobs", "old_logprobs", "advantages", "mask"), args()))
    kw = {"ref_logprobs": torch.randn(2, 3), "entropy": torch.randn(2, 3)}
    (a if name in a else kw)[name] = (
        torch.ones(3, 2, dtype=torch.bool) if name == "mask" else torch.randn(3, 2)
    )
    with pytest.raises(ValueError, match=rf"{name} must have the shape of logprobs \(2, 3\); got \(3, 2\)"):
        policy_loss(*a.values(), **kw)


@pytest.mark.parametrize("shape", [(3,), (2, 4), (2, 3, 1), ()])
def test_rejects_advantages_of_another_shape(shape):
    want = r"advantages must be \(B, T\) = \(2, 3\) or \(B,\) = \(2\) \(one per sequence\); got "
    with pytest.raises(ValueError, match=want):
        policy_loss(*args(advantages=torch.randn(shape)))


def test_rejects_integer_logprobs():
    with pytest.raises(ValueError, match="logprobs must be float32, float64, bfloat16 or float16; got int64"):
        policy_loss(*args(logprobs=torch.ones(2, 3, dtype=torch.long)))


def test_rejects_integer_advantages():
    with pytest.raises(
        ValueError, match="advantages must be float32, float64, bfloat16 or float16; got int32"
    ):
        policy_loss(*args(advantages=torch.ones(2, dtype=torch.int32)))


def test_rejects_integer_mask():
    with pytest.raises(
        ValueError, match=r"mask must be bool or have the dtype of logprobs \(float32\); got int64"
    ):
        policy_loss(*args(mask=torch.ones(2, 3, dtype=torch.long)))


def test_rejects_mismatched_dtype_in_raw_op():
    """The public function casts mixed float dtypes; the raw op refuses them by name."""
    g, mask = make(2, 3)
    a = list(raw_args(g, mask, need_grads=False))
    a[4] = a[4].double()
    with pytest.raises(ValueError, match="ref_logprobs must have the dtype of logprobs"):
        torch.ops.fastrlhf.policy_loss_fwd(*a)


@pytest.mark.parametrize("name", ["eps_low", "eps_high", "beta", "ent_coef"])
@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_rejects_negative_or_nonfinite_coefficients(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite and >= 0; got {value}"):
        policy_loss(*args(), ref_logprobs=torch.randn(2, 3), **{name: value})


def test_rejects_unknown_agg():
    want = "agg must be one of token_mean, seq_mean_token_mean, seq_mean_token_sum_norm; got 'seq_mean'"
    with pytest.raises(ValueError, match=want):
        policy_loss(*args(), agg="seq_mean")
    with pytest.raises(ValueError, match=r"agg must be 0 \(token_mean\), 1 .* got 3"):
        torch.ops.fastrlhf.policy_loss_fwd(*args(), None, None, 0.2, 0.2, 3, 0.0, 3, 0.0, False)


def test_rejects_max_len_outside_dr_grpo_or_below_one():
    with pytest.raises(
        ValueError, match="max_len is only used by agg='seq_mean_token_sum_norm'; got max_len=8"
    ):
        policy_loss(*args(), max_len=8)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"max_len must be an int >= 1; got {bad}"):
            policy_loss(*args(), agg="seq_mean_token_sum_norm", max_len=bad)


def test_rejects_beta_without_reference():
    with pytest.raises(ValueError, match="ref_logprobs is required when beta > 0; got beta=0.1"):
        policy_loss(*args(), beta=0.1)


def test_rejects_tensors_on_different_devices():
    with pytest.raises(ValueError, match="ref_logprobs must be on the same device as logprobs"):
        policy_loss(*args(), ref_logprobs=torch.randn(2, 3, device="meta"))


def test_baseline_isa_path_matches(tmp_path):
    """FASTRLHF_CPU_PATH=base (a fresh process) runs the portable kernels; they agree with this one's."""
    import subprocess
    import sys

    script = (
        "import sys, torch, fastrlhf\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_policy_loss import make, run\n"
        "from fastrlhf.ops import policy_loss\n"
        "torch.manual_seed(0)\n"
        "g, mask = make(5, 203)\n"
        "w = mask * torch.rand(5, 203)\n"
        "out = [run(policy_loss, g, m, agg=a, ent_coef=0.01) for m in (mask, w) for a in ('token_mean', 'seq_mean_token_mean')]\n"
        "torch.save((fastrlhf.build_info()['cpu_path'], out), sys.argv[1])\n"
    )  # fmt: skip
    out, here = tmp_path / "base.pt", os.path.dirname(os.path.abspath(__file__))
    subprocess.run(
        [sys.executable, "-c", script, str(out), here],
        check=True,
        env={**os.environ, "FASTRLHF_CPU_PATH": "base"},
    )
    path, base = torch.load(out)
    assert path == "base"
    torch.manual_seed(0)
    g, mask = make(5, 203)
    w = mask * torch.rand(5, 203)
    here_out = [run(policy_loss, g, m, agg=a, ent_coef=0.01) for m in (mask, w) for a in ("token_mean", "seq_mean_token_mean")]  # fmt: skip
    torch.testing.assert_close(base, here_out, rtol=1e-5, atol=1e-7)


# ---- CUDA: the same kernel contract on the GPU (FASTRLHF_TEST_DEVICE=cpu runs these on the CPU) --------
DEV = os.environ.get("FASTRLHF_TEST_DEVICE", "cuda")


def on_device(test):
    return pytest.mark.gpu(test) if DEV != "cpu" else test


def on(g, mask, dev):
    return {k: v.to(dev) for k, v in g.items()}, mask.to(dev)


@on_device
@pytest.mark.parametrize("agg", POLICY_AGGS)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("per_seq", [False, True])
def test_device_float64_matches_cpu_and_reference(agg, weights, per_seq):
    g, mask = make(64, 300, torch.float64, per_seq=per_seq)
    mask = mask * torch.rand(64, 300, dtype=torch.float64) if weights else mask
    kw = {"agg": agg, "eps_high": 0.28, "ent_coef": 0.01}
    got = run(policy_loss, *on(g, mask, DEV), **kw)
    cpu = run(policy_loss, g, mask, **kw)
    want = run(reference.policy_loss, g, mask, **kw)
    assert got[0].device.type == DEV
    torch.testing.assert_close(list(got), list(cpu), rtol=1e-9, atol=1e-12, check_device=False)
    torch.testing.assert_close(list(got), list(want), rtol=1e-9, atol=1e-12, check_device=False)


@on_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_low_precision_matches_cpu(dtype):
    g, mask = make(16, 200, dtype)
    kw = {"agg": "seq_mean_token_mean", "ent_coef": 0.01}
    got = run(policy_loss, *on(g, mask, DEV), **kw)
    cpu = run(policy_loss, g, mask, **kw)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(list(got), list(cpu), check_device=False, **tol)
