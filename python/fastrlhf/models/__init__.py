"""The GPT-2 model, its scalar-head variant, Hugging Face interop and KV-cache generation."""

from fastrlhf.models.config import GPTConfig
from fastrlhf.models.generate import Generation, generate
from fastrlhf.models.gpt import GPT, IGNORE_INDEX, KVCache, left_pad_layout
from fastrlhf.models.heads import ScalarHeadModel, last_token_index

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "GPTConfig",
    "Generation",
    "KVCache",
    "ScalarHeadModel",
    "generate",
    "last_token_index",
    "left_pad_layout",
]
