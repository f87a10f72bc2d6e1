"""fastrlhf: the InstructGPT recipe (pretrain, SFT, K-wise reward model, PPO-ptx) on fused kernels."""

from fastrlhf._ext import HAS_EXT, build_info

__version__ = "0.1.0"
__all__ = ["HAS_EXT", "__version__", "build_info"]
