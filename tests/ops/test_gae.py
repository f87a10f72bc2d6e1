import fastrlhf
import pytest
import torch
from fastrlhf.ops import gae, reference


def python_loop(rewards, values, mask, gamma, lam):
    """Element by element, as the contract reads: the independent ground truth."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(B):
        live = [t for t in range(T) if mask[b, t]]
        last = live[-1] if live else -1
        next_adv, next_value = 0.0, 0.0
        for t in range(last, -1, -1):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            adv[b, t] = next_adv
    adv = adv * mask
    return adv, (adv + values) * mask


def make(B, T, dtype=torch.float64):
    rewards, values = torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype)
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T  # a row that runs to the last position
    if B > 1:
        lengths[1] = 0  # a row with no response token
    mask = torch.arange(T) < lengths[:, None]
    return rewards, values, mask


def test_extension_is_loaded():
    assert fastrlhf.HAS_EXT, "the tests must exercise the compiled ops, not the fallback"


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 97), (64, 512)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_float64_equals_reference_loop_exactly(B, T, gamma, lam):
    rewards, values, mask = make(B, T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)


def test_reference_matches_scalar_loop():
    rewards, values, mask = make(4, 13)
    mask[2, 3] = False  # a hole inside a response: recursion carries through, output is 0 there
    ref = reference.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    loop = python_loop(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gae(rewards, values, mask, gamma=0.97, lam=0.9), loop, rtol=1e-12, atol=1e-12)


def test_float32_within_1e6_relative():
    rewards, values, mask = make(64, 512)
    adv, ret = gae(rewards.float(), values.float(), mask)
    ref_adv, ref_ret = reference.gae(rewards, values, mask)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_within_half_precision(dtype):
    rewards, values, mask = make(8, 33)
    adv, _ = gae(rewards.to(dtype), values.to(dtype), mask)
    ref_adv, _ = reference.gae(rewards.to(dtype).double(), values.to(dtype).double(), mask)
    assert adv.dtype == dtype
    # fp32 math inside: one rounding to the output dtype
    torch.testing.assert_close(
        adv.double(), ref_adv, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 4
    )


def test_all_masked_rows_are_zero_and_finite():
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    adv, ret = gae(rewards, values, torch.zeros(3, 5, dtype=torch.bool))
    assert torch.count_nonzero(adv) == 0 and torch.count_nonzero(ret) == 0


def test_numeric_mask_and_noncontiguous_inputs():
    rewards, values, mask = make(6, 20)
    r_t, v_t = rewards.t().contiguous().t(), values.t().contiguous().t()  # same values, strided
    adv, ret = gae(r_t, v_t, mask.float())
    torch.testing.assert_close((adv, ret), reference.gae(rewards, values, mask), rtol=0, atol=0)


def test_independent_of_thread_count():
    rewards, values, mask = make(64, 97)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gae(rewards, values, mask)
        torch.set_num_threads(2)
        two = gae(rewards, values, mask)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_opcheck():
    rewards, values, mask = make(4, 9, torch.float32)
    torch.library.opcheck(torch.ops.fastrlhf.gae.default, (rewards, values, mask, 1.0, 0.95))


def test_compile_fullgraph():
    rewards, values, mask = make(4, 9, torch.float32)
    f = torch.compile(lambda r, v, m: gae(r, v, m, gamma=0.99, lam=0.9), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(rewards, values, mask), gae(rewards, values, mask, gamma=0.99, lam=0.9))


# ---- bad input: one test per case -------------------------------------------------------------
def test_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"rewards must be \(B, T\); got shape \(2, 3, 4\)"):
        gae(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool))


def test_rejects_mismatched_values_shape():
    with pytest.raises(ValueError, match=r"values must have the shape of rewards \(2, 3\); got \(2, 4\)"):
        gae(torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_rejects_mismatched_mask_shape():
    with pytest.raises(ValueError, match=r"mask must have the shape of rewards \(2, 3\); got \(3, 2\)"):
        gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_rejects_integer_rewards():
    with pytest.raises(ValueError, match="rewards must be float32, float64, bfloat16 or float16; got int64"):
        gae(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match=r"values must have the dtype of rewards \(float32\); got float64"):
        gae(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("name,kw", [("gamma", {"gamma": 1.5}), ("lam", {"lam": -0.1})])
def test_rejects_gamma_lam_out_of_range(name, kw):
    with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\]"):
        gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), **kw)


def test_rejects_tensors_on_different_devices():
    with pytest.raises(ValueError, match="values must be on the same device as rewards"):
        gae(torch.randn(2, 3), torch.randn(2, 3, device="meta"), torch.ones(2, 3, dtype=torch.bool))
