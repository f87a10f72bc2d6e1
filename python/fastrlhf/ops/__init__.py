"""The fused ops. Each is a torch custom op (torch.ops.fastrlhf.*) with a fake implementation
(torch.compile-able) and, where differentiable, an autograd formula; reference.py holds the
pure-PyTorch twins the tests and benchmarks compare against."""

from fastrlhf.ops.gae import gae

# Public names whose fused kernels have not landed yet are served by the reference twin.
from fastrlhf.ops.reference import causal_attention
from fastrlhf.ops.sample import sample
from fastrlhf.ops.reference import token_logprobs
from fastrlhf.ops.reference import ppo_loss

__all__ = ["causal_attention", "gae", "ppo_loss", "sample", "token_logprobs"]
