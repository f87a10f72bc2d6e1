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


def build_model(config: Any) -> CausalLM:
    """A freshly initialised model of config's family."""
    return FAMILIES[arch_of(config)][1](config)
