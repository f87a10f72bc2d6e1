"""train.preference: answer log-likelihoods over a prefix-sharing batch equal one plain forward per answer
(float64), and the DPO / IPO / Plackett-Luce losses equal their formulas written out."""

import math

import pytest
import torch
from fastrlhf.models import GPTConfig
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.families import build_model
from fastrlhf.models.shared import shared_layout
from fastrlhf.train.preference import pair_loss, plackett_luce_loss, sequence_logprobs

V = 41


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(vocab_size=V, block_size=48, n_layer=2, n_head=2, n_embd=16),
        LlamaConfig(
            vocab_size=V, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, intermediate_size=24
        ),
    ],
    ids=["gpt2", "llama"],
)
def test_sequence_logprobs_equal_one_forward_per_answer(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).double()
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, V, (n,), generator=g).tolist()

    groups = []  # (prompt, answers): K = 3, 2, 4; a one-token answer; answers sharing their first token
    for P, lens in [(5, [3, 1, 6]), (9, [2, 2]), (1, [4, 3, 3, 5])]:
        prompt = ids(P)
        groups.append((prompt, [ids(n) for n in lens]))
    groups[1][1][1] = [groups[1][1][0][0]] + ids(1)  # shares the prompt and one answer token
    seqs = [p + a for p, ans in groups for a in ans]
    sizes = [len(ans) for _, ans in groups]
    resp_len = torch.tensor([len(a) for _, ans in groups for a in ans])
    got = sequence_logprobs(model, shared_layout(seqs, sizes, pad_id=0), resp_len)
    want = []
    for s, n in zip(seqs, resp_len.tolist()):
        logits, _ = model(torch.tensor([s]))  # (1, T, V)
        lp = torch.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(s[1:])[:, None])[:, 0]
        want.append(lp[-n:].sum())
    torch.testing.assert_close(got, torch.stack(want))
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_losses_equal_their_formulas():
    r = torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4], dtype=torch.float64)  # rankings [0, 2, 1] and [3, 4]
    better, worse, owner = torch.tensor([0, 0, 2, 3]), torch.tensor([2, 1, 1, 4]), torch.tensor([0, 0, 0, 1])
    beta = 0.5

    def ls(x):
        return -math.log(1 / (1 + math.exp(-x)))

    first = (ls(beta * 0.2) + ls(beta * 0.5) + ls(beta * 0.3)) / 3
    assert pair_loss(r, better, worse, owner, beta, "sigmoid").item() == pytest.approx(
        (first + ls(beta * 0.9)) / 2
    )
    q = 1 / (2 * beta)
    ipo = (((0.2 - q) ** 2 + (0.5 - q) ** 2 + (0.3 - q) ** 2) / 3 + (0.9 - q) ** 2) / 2
    assert pair_loss(r, better, worse, owner, beta, "ipo").item() == pytest.approx(ipo)
    order = torch.tensor([[0, 2, 1], [3, 4, -1]])
    s = [beta * x for x in r.tolist()]

    def pl(idx):
        return -sum(s[idx[k]] - math.log(sum(math.exp(s[j]) for j in idx[k:])) for k in range(len(idx)))

    assert plackett_luce_loss(r, order, beta).item() == pytest.approx((pl([0, 2, 1]) + pl([3, 4])) / 2)
    # with K = 2 the listwise loss is DPO's pairwise one
    assert plackett_luce_loss(r, torch.tensor([[3, 4]]), beta).item() == pytest.approx(ls(beta * 0.9))
    with pytest.raises(ValueError, match="'sigmoid' or 'ipo'; got 'hinge'"):
        pair_loss(r, better, worse, owner, beta, "hinge")
