"""The PPO fast paths of the model: the lean KV-cache decode step, GPT.hidden's tail (the last block run
on the rows a scorer reads) and the hidden states generate returns for a value head."""

import pytest
import torch
from fastrlhf.models import GPT, GPTConfig, KVCache, generate, left_pad_layout

CFG = GPTConfig(vocab_size=97, block_size=48, n_layer=3, n_head=4, n_embd=32)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16]]


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(3)
    return GPT(CFG).eval()


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()  # as in generate (with gradients on, hidden's linears take torch's GEMM instead of rows_linear)
def test_decode_step_gives_what_hidden_gives_bit_for_bit(bias):
    """decode() runs hidden()'s ops in hidden()'s order for one token: equal, not just close."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**CFG.to_dict(), "bias": bias})).eval()
    x = torch.randint(0, 97, (4, 13))
    seg = torch.ones(4, 13, dtype=torch.long)
    seg[1, :5] = 0  # row 1 left-padded
    pos = left_pad_layout(seg)[0]  # (B, T)
    caches = [KVCache(CFG, 4, 13) for _ in range(2)]
    for c in caches:
        m.hidden(x[:, :9], positions=pos[:, :9], segment_ids=seg[:, :9], cache=c)
    for t in range(9, 13):
        want = m.hidden(
            x[:, t : t + 1], positions=pos[:, t : t + 1], segment_ids=seg[:, : t + 1], cache=caches[0]
        )
        got = m.decode(x[:, t : t + 1], pos[:, t : t + 1], seg[:, : t + 1], caches[1])
        assert torch.equal(got, want[:, 0])
    assert (
        caches[1].length == 13
        and torch.equal(caches[0].k, caches[1].k)
        and torch.equal(caches[0].v, caches[1].v)
    )


@pytest.mark.parametrize("tail", [1, 5, 17])
def test_tail_equals_the_last_rows_of_the_full_forward_with_gradients(m, tail):
    x = torch.randint(0, 97, (3, 17))
    seg = torch.ones(3, 17, dtype=torch.long)
    seg[2, :6] = 0
    pos = left_pad_layout(seg)[0]
    full = m.hidden(x, positions=pos, segment_ids=seg)  # (B, T, C)
    part = m.hidden(x, positions=pos, segment_ids=seg, tail=tail)  # (B, tail, C)
    assert part.shape == (3, tail, CFG.n_embd)
    torch.testing.assert_close(part, full[:, -tail:], atol=1e-5, rtol=1e-5)
    w = torch.randn_like(part)
    g_full = torch.autograd.grad((full[:, -tail:] * w).sum(), list(m.parameters()))
    g_part = torch.autograd.grad((part * w).sum(), list(m.parameters()))
    for a, b in zip(g_full, g_part):
        # the tail runs the last block's GEMMs on fewer rows (another summation order): entries may differ
        # by a few ulps of the tensor's largest entry (~100 here), which a per-element rtol misses
        torch.testing.assert_close(a, b, atol=max(1e-5, 1e-6 * b.abs().max().item()), rtol=1e-4)


def test_tail_with_a_cache_fills_every_rows_keys(m):
    """A prefill with tail=1 must still cache the keys and values of every prompt position."""
    x = torch.randint(0, 97, (2, 10))
    a, b = KVCache(CFG, 2, 12), KVCache(CFG, 2, 12)
    full = m.hidden(x, cache=a)
    last = m.hidden(x, cache=b, tail=1)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.k, b.k, atol=0, rtol=0)
    torch.testing.assert_close(a.v, b.v, atol=0, rtol=0)
    assert a.length == b.length == 10


@pytest.mark.parametrize("tail", [-1, 11])
def test_bad_tail(m, tail):
    with pytest.raises(ValueError, match=rf"tail must be in \[0, T = 10\]; got {tail}"):
        m.hidden(torch.zeros(2, 10, dtype=torch.long), tail=tail)


@pytest.mark.parametrize("eos", [None, 4])
def test_generation_hidden_states_equal_a_rescore(m, eos):
    g = generate(
        m,
        PROMPTS,
        9,
        temperature=0.9,
        eos_token_id=eos,
        return_hidden=True,
        generator=torch.Generator().manual_seed(2),
    )
    pos, seg = g.layout()
    Tp = g.prompt_mask.shape[1]
    want = m.hidden(g.sequences, positions=pos, segment_ids=seg)[:, Tp - 1 : -1]  # (B, Tr, C)
    assert g.hidden.shape == want.shape
    keep = g.response_mask  # after EOS the sampler's states belong to padding it never scored
    torch.testing.assert_close(g.hidden[keep], want[keep], atol=1e-5, rtol=1e-5)
    assert generate(m, PROMPTS, 3).hidden is None


def test_response_mask_without_eos_is_all_true(m):
    g = generate(m, PROMPTS, 6, generator=torch.Generator().manual_seed(0))
    assert g.response_mask.all() and g.response_mask.shape == (4, 6)
