import math

import pytest
import torch
from fastrlhf.models import GPT, GPTConfig, KVCache, ScalarHeadModel, last_token_index, left_pad_layout
from fastrlhf.models.transformer import next_token_loss

CFG = GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32)


def model(cfg=CFG, **kw):
    return GPT(GPTConfig(**{**cfg.to_dict(), **kw})).eval()


def test_shapes_and_initial_loss_near_uniform():
    m = model()
    x = torch.randint(0, 97, (3, 19))
    logits, loss = m(x, torch.randint(0, 97, (3, 19)))
    assert logits is None  # the LM head is fused with the loss: no logits with targets
    assert m(x)[0].shape == (3, 19, 97)
    assert abs(loss.item() - math.log(97)) < 0.1  # small init: close to the uniform distribution
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.lm_head.weight is m.transformer.wte.weight


def test_ignore_index_targets_are_left_out():
    m = model()
    x = torch.randint(0, 97, (2, 9))
    t = x.clone()
    t[:, :4] = -100
    loss = m(x, t)[1]
    logits = m(x)[0]
    want = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), x[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, want)


def test_left_padding_is_exact():
    m = model()
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 4))
    batch = torch.cat(
        [a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)]
    )  # (2, 11) row 1 left-padded
    mask = torch.ones(2, 11)
    mask[1, :7] = 0
    pos, seg = left_pad_layout(mask)
    out = m(batch, positions=pos, segment_ids=seg)[0]
    torch.testing.assert_close(out[0], m(a)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 7:], m(b)[0][0], atol=1e-5, rtol=1e-5)


def test_packed_documents_are_exact():
    m = model()
    docs = [torch.randint(0, 97, (1, n)) for n in (5, 1, 13)]
    packed = torch.cat(docs, 1)  # (1, 19)
    seg = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    out = m(packed, positions=pos, segment_ids=seg)[0]
    starts = [0, 5, 6, 19]
    for d, s, e in zip(docs, starts, starts[1:]):
        torch.testing.assert_close(out[0, s:e], m(d)[0][0], atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    m = model()
    x = torch.randint(0, 97, (3, 23))
    mask = torch.ones(3, 23)
    mask[1, :6] = 0  # one left-padded row
    pos, seg = left_pad_layout(mask)
    full = m(x, positions=pos, segment_ids=seg)[0]
    cache = KVCache(m.config, 3, 23)
    chunks = [m(x[:, :9], positions=pos[:, :9], segment_ids=seg[:, :9], cache=cache)[0]]
    for t in range(9, 23):
        chunks.append(
            m(x[:, t : t + 1], positions=pos[:, t : t + 1], segment_ids=seg[:, : t + 1], cache=cache)[0]
        )
    assert cache.length == 23
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_dropout_is_active_only_in_training():
    m = model(dropout=0.5)
    x = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


def test_bias_free_model_has_no_biases():
    m = model(bias=False)
    assert not [n for n, _ in m.named_parameters() if n.endswith("bias")]
    assert torch.isfinite(m(torch.randint(0, 97, (1, 5)))[0]).all()


def test_token_ids_outside_the_vocab():
    m = model()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\); got ids in \[0, 97\]"):
        m(torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match=r"got ids in \[-1"):
        m(torch.tensor([[-1, 3]]))


def test_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match="sequence length 49 .* exceeds block_size 48"):
        model()(torch.zeros(1, 49, dtype=torch.long))


def test_bad_idx_and_layout_shapes():
    m = model()
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) int64 tensor"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        m(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids must be"):
        m(torch.zeros(2, 5, dtype=torch.long), segment_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must be"):
        m(torch.zeros(2, 5, dtype=torch.long), positions=torch.zeros(2, 4, dtype=torch.long))


def test_bad_config():
    with pytest.raises(ValueError, match="n_embd must be a multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({"n_layers": 2})


def test_weights_that_do_not_match_the_config():
    weights = model().weights()
    assert "lm_head.weight" not in weights
    with pytest.raises(
        ValueError, match=r"wrong shapes: transformer.wte.weight: expected \(98, 32\), got \(97, 32\)"
    ):
        model(vocab_size=98).load_weights(weights)
    with pytest.raises(ValueError, match=r"missing \['transformer.h.2"):
        model(n_layer=3).load_weights(weights)
    with pytest.raises(ValueError, match="unexpected"):
        model(n_layer=1).load_weights(weights)


def test_scalar_head_from_gpt_scores_the_chosen_token():
    gpt = model()
    rm = ScalarHeadModel.from_gpt(gpt)
    x = torch.randint(0, 97, (3, 10))
    torch.testing.assert_close(rm.trunk.hidden(x), gpt.hidden(x))
    values = rm(x)
    assert values.shape == (3, 10)
    mask = torch.ones(3, 10)
    mask[0, 7:] = 0
    idx = last_token_index(mask)
    assert idx.tolist() == [6, 9, 9]
    score = rm.score(x, idx)
    torch.testing.assert_close(score, values[torch.arange(3), idx])
    score.sum().backward()
    assert rm.head.weight.grad is not None and rm.trunk.transformer.wte.weight.grad is not None
    with pytest.raises(ValueError, match="index must be"):
        rm.score(x, torch.tensor([0, 1, 10]))
    rm2 = ScalarHeadModel(gpt.config)
    rm2.load_weights(rm.weights())
    torch.testing.assert_close(rm2(x), values)


def test_training_loss_and_gradients_equal_the_unfused_path_in_float64():
    m = model(dropout=0.0).double().train()
    x = torch.randint(0, 97, (3, 13))
    t = torch.roll(x, -1, 1)
    t[:, -1] = -100
    t[1, :5] = -100
    loss = m(x, t)[1]
    got = torch.autograd.grad(loss, list(m.parameters()))
    want_loss = next_token_loss(m(x)[0], t)  # logits, then ops.token_logprobs (the path before the fusion)
    want = torch.autograd.grad(want_loss, list(m.parameters()))
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_next_token_loss_equals_cross_entropy_with_gradients(dtype):
    logits = torch.randn(3, 7, 101, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 101, (3, 7))
    targets[0, :3] = -100
    targets[2] = -100
    loss = next_token_loss(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    (want_grad,) = torch.autograd.grad(want, logits)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, want, **tol)
    torch.testing.assert_close(grad, want_grad, **tol)
    assert (grad[2] == 0).all() and (grad[0, :3] == 0).all()


def test_next_token_loss_of_no_kept_target_is_nan_like_cross_entropy():
    logits = torch.randn(2, 3, 11)
    targets = torch.full((2, 3), -100)
    assert next_token_loss(logits, targets).isnan()
    assert torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).isnan()
