"""The architecture families by name: the `arch` a checkpoint records, its config class and its model."""

from __future__ import annotations

from typing import Any

from fastrlhf.models.config import GPTConfig, LlamaConfig
from fastrlhf.models.gpt2 import GPT
from fastrlhf.models.llama import LlamaForCausalLM
from fastrlhf.models.transformer import CausalLM

FAMILIES: dict[str, tuple[type, type[CausalLM]]] = {
    "gpt2": (GPTConfig, GPT),
    "llama": (LlamaConfig, LlamaForCausalLM),  # also Mistral, Qwen2, Qwen3 (LlamaConfig.family)
}


def arch_of(config: Any) -> str:
    """The family name of a config object."""
    for arch, (cfg_cls, _) in FAMILIES.items():
        if isinstance(config, cfg_cls):
            return arch
    raise ValueError(f"no model family has a config of type {type(config).__name__}")


def config_from_dict(arch: str, d: dict[str, Any]) -> Any:
    if arch not in FAMILIES:
        raise ValueError(f"unknown model arch {arch!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[arch][0].from_dict(d)


def parameter_count(config: Any) -> int:
    """Parameters a model of this config holds (a tied LM head counted once), from the sizes alone."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    if arch_of(config) == "gpt2":
        b = int(config.bias)
        block = 12 * C * C + b * 9 * C + (2 + 2 * b) * C  # c_attn, c_proj, c_fc, c_proj (+ biases), 2 LNs
        return V * C + config.block_size * C + L * block + (1 + b) * C
    q, kv, inner = (
        config.n_head * config.head_dim,
        config.n_kv_head * config.head_dim,
        config.intermediate_size,
    )
    block = C * q + 2 * C * kv + q * C + 3 * C * inner + 2 * C  # q, k, v, o; gate, up, down; two norms
    block += int(config.attention_bias) * (q + 2 * kv) + int(config.qk_norm) * 2 * config.head_dim
    return V * C * (1 if config.tie_word_embeddings else 2) + L * block + C


def available_memory() -> int | None:
    """Bytes the system can still give this process (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


TRAINING_BYTES = 16  # per parameter to train in fp32 with AdamW: weights, gradients, two moments


def build_model(config: Any, bytes_per_param: int = 4) -> CausalLM:
    """A freshly initialised model of config's family. Its memory (bytes_per_param a parameter: 4 for fp32
    weights, TRAINING_BYTES to train them) is checked first against what the machine has available, so a
    config with a typo in a size (block_size = 100000000) fails with a message, not the out-of-memory killer."""
    need, free = bytes_per_param * parameter_count(config), available_memory()
    if free is not None and need > free:
        what = (
            "to train (weights, gradients, AdamW's moments)"
            if bytes_per_param > 4
            else "for its fp32 weights"
        )
        sizes = ", ".join(
            f"{k}={getattr(config, k)}" for k in ("vocab_size", "block_size", "n_layer", "n_embd")
        )
        raise ValueError(
            f"this model config needs {need / 2**30:.1f} GiB {what}, more than the {free / 2**30:.1f} GiB this "
            f"machine has available ({sizes}): check these sizes"
        )
    return FAMILIES[arch_of(config)][1](config)
