"""Scalar-head models for the reward and value functions: the GPT trunk plus a linear head that maps
each token's final hidden state to one number (InstructGPT's RM: the 6B/175B LM with its unembedding
replaced by a scalar projection; arXiv 2203.02155, section 3.5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastrlhf.models.families import build_model
from fastrlhf.models.shared import SharedBatch
from fastrlhf.models.transformer import CausalLM, load_checked


class ScalarHeadModel(nn.Module):
    """values = head(trunk(idx)): (B, T) per-token scalars; `score` reads one chosen token per row, and
    forward(shared=SharedBatch) the last token of each sequence of a prefix-sharing batch."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.trunk = build_model(config)  # any family's CausalLM; its LM head is unused here
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt: CausalLM) -> ScalarHeadModel:
        """A scalar model whose trunk starts as a copy of a language model's weights."""
        model = cls(gpt.config).to(next(gpt.parameters()).device)
        model.trunk.load_weights(gpt.weights(), source="language-model weights")
        return model

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        shared: SharedBatch | None = None,
    ) -> Tensor:
        """(B, T) scalars, one per token of idx (B, T); positions/segment_ids as in GPT.hidden. With
        shared (and no idx): (N,) the scalar at each sequence's last token, every group's shared prefix
        run once (model.shared); a forward, so that a DDP wrapper syncs its gradients."""
        if shared is not None:
            if idx is not None:
                raise ValueError("pass either idx or shared, not both")
            return self.head(self.trunk.shared_hidden(shared)).squeeze(-1)  # (N,)
        if idx is None:
            raise ValueError("forward needs idx (B, T) or shared")
        h = self.trunk.hidden(idx, positions=positions, segment_ids=segment_ids)  # (B, T, C)
        return self.head(h).squeeze(-1)  # (B, T)

    def score(
        self,
        idx: Tensor,
        index: Tensor,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """(B,) the scalar at token index[b] of each row, e.g. the last response token for a reward:
        self(idx, ...)[b, index[b]], with the last block past its keys/values run at that token only."""
        h = self.trunk.hidden_at(idx, index, positions=positions, segment_ids=segment_ids)  # (B, C)
        return self.head(h).squeeze(-1)  # (B,)

    def weights(self) -> dict[str, Tensor]:
        tied = tuple(f"trunk.{t}" for t in self.trunk.tied)
        return {k: v for k, v in self.state_dict().items() if not (tied and k.endswith(tied))}

    def load_weights(self, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
        tied = tuple(f"trunk.{t}" for t in self.trunk.tied)
        load_checked(
            self, {k: v for k, v in tensors.items() if not (tied and k.endswith(tied))}, source, tied
        )


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last 1 in each row of a (B, T) mask (0 for an all-zero row)."""
    T = mask.shape[1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), idx, 0).amax(dim=1)
