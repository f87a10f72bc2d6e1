"""Model configs, one per architecture family: their sizes, checked once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class GPTConfig:
    """GPT-2 shapes. The defaults are a tiny model that trains on a laptop CPU."""

    vocab_size: int = 4096
    """Token ids are in [0, vocab_size)."""
    block_size: int = 256
    """Context length: the number of learned positions."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; n_embd % n_head == 0."""
    n_embd: int = 256
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on the embeddings and on each residual branch (not on attention probabilities)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms (GPT-2 has them)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int; got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd must be a multiple of n_head; got n_embd={self.n_embd}, n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1); got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        return self.n_head  # GPT-2 has no grouped-query attention

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)


ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    """The Llama family's shapes (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral within its window, Qwen2 /
    Qwen2.5 with q/k/v biases, Qwen3 with per-head q/k norms). The defaults are a tiny laptop model."""

    family: str = "llama"
    """The HF model_type: 'llama' (also SmolLM, TinyLlama, Mistral), 'qwen2' or 'qwen3'."""
    vocab_size: int = 4096
    block_size: int = 2048
    """Context length used here (HF's max_position_embeddings)."""
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    """Key/value heads (grouped-query attention); n_head % n_kv_head == 0."""
    n_embd: int = 256
    head_dim: int = 0
    """Per-head width; 0 = n_embd // n_head (Qwen3 sets its own)."""
    intermediate_size: int = 688
    """SwiGLU MLP width."""
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None, {'rope_type': 'linear', 'factor': f} or Llama 3.1's {'rope_type': 'llama3', 'factor',
    'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'}."""
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    """Biases on q/k/v (Qwen2's; o_proj never has one)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before the rotation (Qwen3)."""
    dropout: float = 0.0
    """Dropout on each residual branch (pretrained chat models use none)."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "n_embd",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int; got {value!r}")
        if self.family not in ("llama", "qwen2", "qwen3"):
            raise ValueError(f"LlamaConfig.family must be 'llama', 'qwen2' or 'qwen3'; got {self.family!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"LlamaConfig.n_head must be a multiple of n_kv_head; got {self.n_head} and {self.n_kv_head}"
            )
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"LlamaConfig.n_embd must be a multiple of n_head (or set head_dim); got {self.n_embd}, {self.n_head}"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2 or self.head_dim > 256:
            raise ValueError(
                f"LlamaConfig.head_dim must be even and <= 256 (rotary pairs); got {self.head_dim}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(
                    f"LlamaConfig.rope_scaling type {kind!r} is not supported; supported: {list(ROPE_TYPES)}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LlamaConfig.dropout must be in [0, 1); got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LlamaConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)
