"""The fused ops. Each is a torch custom op (torch.ops.fastrlhf.*) with a fake implementation
(torch.compile-able) and, where differentiable, an autograd formula; reference.py holds the
pure-PyTorch twins the tests and benchmarks compare against."""

from fastrlhf.ops.gae import gae

__all__ = ["gae"]
