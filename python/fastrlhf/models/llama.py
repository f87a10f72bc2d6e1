"""The Llama family (Touvron et al. 2023, arXiv 2302.13971; Llama 3, arXiv 2407.21783) on the trunk:
RMSNorm, rotary position embeddings (RoFormer, arXiv 2104.09864) with linear and Llama 3.1 scaling,
grouped-query attention (arXiv 2305.13245), SwiGLU MLP (arXiv 2002.05202), tied or untied embeddings.
Qwen2/2.5 adds q/k/v biases, Qwen3 an RMSNorm over each head of q and k. Blocks and weight names only:
the names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`), so HF checkpoints load as they
are and `config_from_hf` / `config_to_hf` are the whole name table."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.transformer import CausalLM, Linear

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (Zhang & Sennrich 2019, arXiv 1910.07467)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: LlamaConfig) -> Tensor:
    """(head_dim / 2,) fp32 rotation frequencies theta^(-2i/d), rescaled as cfg.rope_scaling says:
    'linear' divides every frequency by the factor (positions interpolated); 'llama3' (Llama 3.1) leaves
    high frequencies alone, divides low ones by the factor and blends in between."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))  # (D/2,)
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, blended, scaled)
    return inv


def rotate(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """RoPE on the heads x (B, T, n, D) at positions (B, T) or (T,), returned in attention's layout
    (B, n, T, D), in HF's half-split layout: the pairs are (x[i], x[i + D/2]), so checkpoints need no
    permutation. One pass (ops.rope), which also does the transpose."""
    return ops.rope(x, None, positions, inv_freq)[0]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def heads(
        self, proj: nn.Module, h: Tensor, n: int, norm: nn.Module | None, positions: Tensor | None
    ) -> Tensor:
        """n heads of proj(h) for h (B, T, C): (B, n, T, D), normed per head (Qwen3) and rotated."""
        B, T, _ = h.shape
        x = proj(h).view(B, T, n, self.head_dim)  # (B, T, n, D)
        if norm is not None:
            x = norm(x)
        if positions is None:
            return x.transpose(1, 2)  # (B, n, T, D)
        return rotate(x, positions, self.inv_freq)  # (B, n, T, D), contiguous


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def norm_in(self, x: Tensor) -> Tensor:
        return self.input_layernorm(x)

    def project(self, h: Tensor, positions: Tensor, parts: str) -> list[Tensor]:
        """q (B, H, T, D) and/or k, v (B, Hkv, T, D) of h (B, T, C), q and k rotated to `positions`."""
        a, out = self.self_attn, []
        if "q" in parts:
            out.append(a.heads(a.q_proj, h, a.n_head, a.q_norm, positions))
        if "kv" in parts:
            out.append(a.heads(a.k_proj, h, a.n_kv_head, a.k_norm, positions))
            out.append(a.heads(a.v_proj, h, a.n_kv_head, None, None))
        return out

    def finish(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None) -> Tensor:
        B, Tq, _ = x.shape
        y = ops.causal_attention(q, k, v, segment_ids=segment_ids)  # (B, H, Tq, D)
        y = y.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, H * D)
        x = x + self.drop(self.self_attn.o_proj(y))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                norm=RMSNorm(config.n_embd, config.rms_norm_eps),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied = ("lm_head.weight",)
        for m in self.modules():  # HF's initializer_range 0.02; norms start at 1
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, idx: Tensor, positions: Tensor) -> Tensor:
        return self.model.embed_tokens(idx)  # (B, T, C): positions enter as rotations, in each block

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def norm_f(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def hf_config(self) -> dict[str, Any]:
        return config_to_hf(self.config)

    def hf_tensors(self) -> dict[str, Tensor]:
        return self.weights()  # HF's names already; a tied head is stored once, as save_pretrained does


# ---- Hugging Face config.json <-> LlamaConfig (the weight names are HF's already) ------------------------
def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from an HF config.json dict of a Llama, Mistral, Qwen2 or Qwen3 model; a feature this
    family does not have (another activation, MLP biases, sliding windows, other RoPE types) is an error
    that names it."""
    family = d.get("model_type")
    if family not in HF_ARCHITECTURES:
        raise ValueError(
            f"model_type {family!r} is not a Llama-family model; supported: {sorted(HF_ARCHITECTURES)} (and gpt2)"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{family}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("mlp_bias"):
        raise ValueError(f"{family}: mlp_bias = true is not supported")
    if d.get("use_sliding_window") or (family == "mistral" and d.get("sliding_window")):
        window = d.get("sliding_window")
        if family != "mistral" or not window:
            raise ValueError(f"{family}: sliding-window attention is not supported")
        d = {**d, "max_position_embeddings": min(d.get("max_position_embeddings", window), window)}
    rope = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{family}: partial rotary embeddings are not supported")
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None
    return LlamaConfig(
        family="llama" if family == "mistral" else family,
        vocab_size=d["vocab_size"],
        block_size=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"],
        n_head=d["num_attention_heads"],
        n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"],
        n_embd=d["hidden_size"],
        head_dim=d.get("head_dim") or 0,
        intermediate_size=d["intermediate_size"],
        rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
        qk_norm=family == "qwen3",
    )


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """The config.json that transformers' AutoModelForCausalLM reads back as the same model."""
    d: dict[str, Any] = dict(
        model_type=cfg.family,
        architectures=[HF_ARCHITECTURES[cfg.family]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        torch_dtype="float32",
    )
    if cfg.family != "qwen2":
        d["attention_bias"] = cfg.attention_bias
    if cfg.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    return d
