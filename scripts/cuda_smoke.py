"""Every CUDA kernel once on small, ugly shapes (forward and backward), for compute-sanitizer
(scripts/cuda_sanitize.sh): small enough that memcheck and racecheck finish in minutes."""

from __future__ import annotations

import torch
from fastrlhf.ops import causal_attention, gae, ppo_loss, sample, token_logprobs


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        r, v = torch.randn(3, 1100, device=dev, dtype=dtype), torch.randn(3, 1100, device=dev, dtype=dtype)
        gae(r, v, torch.rand(3, 1100, device=dev) > 0.2)  # > one 1024-step chunk

        xs = [torch.randn(5, 37, device=dev, dtype=dtype, requires_grad=i in (0, 3)) for i in range(6)]
        ent = torch.rand(5, 37, device=dev, dtype=dtype, requires_grad=True)
        loss, _ = ppo_loss(*xs, torch.rand(5, 37, device=dev) > 0.3, entropy=ent, ent_coef=0.01)
        loss.backward()

        full = torch.randn(2, 6, 1003, device=dev, dtype=dtype)
        logits = full[:, :-1].detach().requires_grad_()  # a strided view, V odd
        lp, en = token_logprobs(logits, torch.randint(0, 1003, (2, 5), device=dev), return_entropy=True)
        (lp.float().sum() + en.float().sum()).backward()

        x = torch.randn(7, 3001, device=dev, dtype=dtype)
        for kw in (
            {},
            {"top_k": 20},
            {"top_p": 0.8},
            {"top_k": 50, "top_p": 0.5, "min_p": 0.1},
            {"temperature": 0.0},
        ):
            sample(x, **kw)

        for B, H, Hkv, Tq, Tk, D in ((2, 4, 2, 37, 37, 40), (1, 2, 1, 1, 45, 128), (1, 2, 2, 20, 70, 256)):
            q = torch.randn(B, H, Tq, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, Hkv, Tk, D, device=dev, dtype=dtype, requires_grad=True)
            vv = torch.randn(B, Hkv, Tk, D, device=dev, dtype=dtype, requires_grad=True)
            seg = torch.cumsum(torch.rand(B, Tk, device=dev) < 0.1, dim=1)
            causal_attention(q, k, vv, segment_ids=seg).float().sum().backward()
    torch.cuda.synchronize()
    print("cuda smoke: every kernel ran")


if __name__ == "__main__":
    main()
