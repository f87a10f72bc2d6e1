"""The fused ops. Each is a torch custom op (torch.ops.fastrlhf.*) with a fake implementation
(torch.compile-able) and, where differentiable, an autograd formula; reference.py holds the
pure-PyTorch twins the tests and benchmarks compare against."""

from fastrlhf.ops.attention import causal_attention
from fastrlhf.ops.gae import gae
from fastrlhf.ops.gelu import gelu
from fastrlhf.ops.linear import linear, rows_linear
from fastrlhf.ops.linear_ce import linear_cross_entropy
from fastrlhf.ops.logprobs import token_logprobs
from fastrlhf.ops.policy_loss import policy_loss
from fastrlhf.ops.ppo_loss import ppo_loss
from fastrlhf.ops.rms_norm import rms_norm
from fastrlhf.ops.rope import rope
from fastrlhf.ops.sample import sample
from fastrlhf.ops.swiglu import swiglu

__all__ = [
    "causal_attention",
    "gae",
    "gelu",
    "linear",
    "linear_cross_entropy",
    "policy_loss",
    "ppo_loss",
    "rms_norm",
    "rope",
    "rows_linear",
    "sample",
    "swiglu",
    "token_logprobs",
]
