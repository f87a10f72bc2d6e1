"""The GPT-2 architecture (Radford et al. 2019; arXiv 2005.14165) in the shape of nanoGPT's model.py:
learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied input/output embeddings. Blocks and weight
names only: the forward passes (training, `tail`, decode, read-one-token, shared-prefix) are the trunk's
(models/transformer.py). Parameter names are GPT-2's, so HF weights map one to one (models/hf.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.models.config import GPTConfig
from fastrlhf.models.transformer import CausalLM, Linear

_CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)  # HF: (in, out)
TIED = "lm_head.weight"  # the output matrix is transformer.wte.weight; checkpoints store it once


def _linear(lin: nn.Linear, x: Tensor) -> Tensor:
    """A block linear without nn.Module.__call__ (see GPT2Block), unless it is an adapted one (LoRA)."""
    return ops.linear(x, lin.weight, lin.bias) if type(lin) is Linear else lin(x)


_PARTS = {"qkv": slice(0, 3), "q": slice(0, 1), "kv": slice(1, 3)}  # rows of c_attn, in units of C


def _drop(x: Tensor, d: nn.Dropout) -> Tensor:
    """d(x) without the module call (a no-op in eval mode)."""
    return F.dropout(x, d.p, d.training) if d.training else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; HF weights only match with it.
        return self.dropout(self.c_proj(ops.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    # The three calls run the submodules' own functions on their parameters rather than through
    # nn.Module.__call__: the same ops in the same order (the same numbers), without the per-call overhead
    # that dominates a one-token decode step of a small model.
    def norm_in(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.ln_1.normalized_shape, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)

    def project(self, h: Tensor, positions: Tensor, parts: str) -> list[Tensor]:
        """The q/k/v heads of h (B, T, C) that `parts` names, each (B, H, T, D): one GEMM over the rows of
        the fused c_attn they need (positions are unused: GPT-2 adds them at the embedding)."""
        B, T, C = h.shape
        rows, lin = _PARTS[parts], self.attn.c_attn
        if type(lin) is not Linear:  # an adapted linear (LoRA): its own forward, then the rows it needs
            y = lin(h)[..., rows.start * C : rows.stop * C]
            H, D = self.attn.n_head, self.attn.head_dim
            return [t.view(B, T, H, D).transpose(1, 2) for t in y.split(C, dim=2)]
        w, b = lin.weight, lin.bias
        if parts != "qkv":  # ((stop - start) C, C): a contiguous row slice
            w = w[rows.start * C : rows.stop * C]
            b = None if b is None else b[rows.start * C : rows.stop * C]
        H, D = self.attn.n_head, self.attn.head_dim
        return [t.view(B, T, H, D).transpose(1, 2) for t in ops.linear(h, w, b).split(C, dim=2)]

    def finish(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None) -> Tensor:
        B, Tq, C = x.shape
        a, m, ln = self.attn, self.mlp, self.ln_2
        y = ops.causal_attention(q, k, v, segment_ids=segment_ids)  # (B, H, Tq, D)
        y = y.transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C): heads side by side
        x = x + _drop(_linear(a.c_proj, y), a.resid_dropout)
        h = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        # GPT-2's "gelu_new" is the tanh approximation; HF weights only match with it.
        h = ops.gelu(_linear(m.c_fc, h))
        return x + _drop(_linear(m.c_proj, h), m.dropout)


class GPT(CausalLM):
    tied = (TIED,)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: Tensor, positions: Tensor) -> Tensor:
        tr = self.transformer
        return _drop(
            F.embedding(idx, tr.wte.weight) + F.embedding(positions, tr.wpe.weight), tr.drop
        )  # (B, T, C)

    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def norm_f(self, x: Tensor) -> Tensor:
        ln = self.transformer.ln_f
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    # ---- Hugging Face's names and layouts (GPT2LMHeadModel); reading them back: models/hf.py -------------
    def hf_config(self) -> dict[str, Any]:
        return config_to_hf_dict(self.config)

    def hf_tensors(self) -> dict[str, Tensor]:
        sd = state_dict_to_hf(self)
        del sd["lm_head.weight"]  # tied: save_pretrained stores it once too
        return sd


def config_to_hf_dict(config: GPTConfig) -> dict[str, Any]:
    """The fields of a GPT2Config equal to config (attention dropout 0: ours has none)."""
    eos = config.vocab_size - 1
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_ctx=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_eps,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )


def state_dict_to_hf(gpt: GPT) -> dict[str, Tensor]:
    """GPT2LMHeadModel's names and layouts (lm_head included, equal to wte); a bias-free model gets zeros."""
    out = {}
    for k, v in gpt.weights().items():
        out[k] = v.t().contiguous() if k.endswith(_CONV1D) else v.clone()
    if not gpt.config.bias:
        C, L = gpt.config.n_embd, gpt.config.n_layer
        zeros = {
            "ln_1.bias": C,
            "attn.c_attn.bias": 3 * C,
            "attn.c_proj.bias": C,
            "ln_2.bias": C,
            "mlp.c_fc.bias": 4 * C,
            "mlp.c_proj.bias": C,
        }
        for i in range(L):
            out.update({f"transformer.h.{i}.{k}": torch.zeros(n) for k, n in zeros.items()})
        out["transformer.ln_f.bias"] = torch.zeros(C)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
