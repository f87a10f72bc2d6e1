import copy
import math

import pytest
import torch
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.train.optim import OptimConfig, lr_at, make_adamw, optimizer_step

CFG = GPTConfig(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_warmup_then_cosine_to_min_lr():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, c, 110) == pytest.approx(0.1) and lr_at(9, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, c, 110) == pytest.approx(0.1) and lr_at(500, c, 110) == pytest.approx(0.1)
    assert all(lr_at(s, c, 110) >= lr_at(s + 1, c, 110) for s in range(10, 120))


def test_weight_decay_on_matrices_only():
    model = GPT(CFG)
    decay, no_decay = make_adamw(model, OptimConfig(weight_decay=0.3)).param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()  # tied once


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    a = GPT(CFG)
    b = copy.deepcopy(a)
    x = torch.randint(0, 67, (8, 16))
    oa, ob = make_adamw(a, OptimConfig()), make_adamw(b, OptimConfig())
    loss_a, norm_a = optimizer_step(a, oa, lambda i: a(x, x)[1], 1, 1e-3, 0.0)
    loss_b, norm_b = optimizer_step(
        b, ob, lambda i: b(x[4 * i : 4 * i + 4], x[4 * i : 4 * i + 4])[1], 2, 1e-3, 0.0
    )
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_clipping_reports_the_norm_before_clipping():
    torch.manual_seed(0)
    model = GPT(CFG)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 67, (4, 16))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, norm = optimizer_step(model, opt, lambda i: model(x, x)[1] * 100, 1, 1.0, 0.5)
    assert norm > 0.5 and math.isfinite(loss)
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before)))
    assert step.item() == pytest.approx(0.5, rel=1e-4)  # SGD lr 1: the update is the clipped gradient


def test_bad_optim_config():
    with pytest.raises(ValueError, match=r"optim.min_lr must be in \[0.0, 0.0001\]; got 0.001"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match=r"optim.warmup_steps must be in \[0, inf\]; got -1"):
        OptimConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"optim.grad_clip must be in \[0.0, inf\); got inf"):
        OptimConfig(grad_clip=float("inf"))


def test_bf16_autocast_on_the_cpu_when_asked_and_only_then():
    """train.dtype = 'auto' computes fp32 on the CPU; 'bf16' autocasts there too (matmuls in bf16, the loss
    and the gradients of the fp32 weights in fp32), close to the fp32 step; 'fp16' needs a GPU."""
    import warnings

    from fastrlhf.models.config import LlamaConfig
    from fastrlhf.models.llama import LlamaForCausalLM
    from fastrlhf.train.optim import autocast_for

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128
    )
    model, cpu = LlamaForCausalLM(cfg), torch.device("cpu")
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    seen, grads = {}, {}
    for dt in ("fp32", "auto", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the slow-bf16 warning on CPUs without AVX512-BF16
            with autocast_for(cpu, dt):
                _, loss = model(x, y)
        loss.backward()
        seen[dt] = (loss.dtype, loss.item())
        grads[dt] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
    assert seen["auto"] == seen["fp32"] and all(map(torch.equal, grads["auto"], grads["fp32"]))
    assert seen["bf16"][0] == torch.float32 and abs(seen["bf16"][1] - seen["fp32"][1]) < 2e-2
    assert seen["bf16"][1] != seen["fp32"][1]  # bf16 matmuls did run
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads["bf16"])
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        autocast_for(cpu, "fp16")


def test_online_rl_refuses_bf16_on_the_cpu():
    from fastrlhf.rl.trainer import OnlineTrainer
    from fastrlhf.train.loop import LoopConfig

    with pytest.raises(ValueError, match="train.dtype = 'bf16' on the CPU: the sampler's log-probs"):
        OnlineTrainer(
            LoopConfig(dtype="bf16"),
            GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=1, n_embd=8)),
            [[1, 2]],
            1,
            max_nonfinite=3,
        )
