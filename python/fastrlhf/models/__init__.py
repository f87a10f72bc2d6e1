"""Models: the trunk written once (transformer.py), the architectures on it (gpt2.py), scalar heads,
Hugging Face interop and KV-cache generation."""

from fastrlhf.models.config import GPTConfig
from fastrlhf.models.generate import Generation, generate
from fastrlhf.models.gpt2 import GPT
from fastrlhf.models.heads import ScalarHeadModel, last_token_index
from fastrlhf.models.transformer import IGNORE_INDEX, CausalLM, KVCache, left_pad_layout

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "CausalLM",
    "GPTConfig",
    "Generation",
    "KVCache",
    "ScalarHeadModel",
    "generate",
    "last_token_index",
    "left_pad_layout",
]
