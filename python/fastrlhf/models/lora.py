"""LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen base linear W plus a trainable low-rank update,
y = x W^T + b + (alpha / r) * dropout(x) A^T B^T with A (r, in), B (out, r), B = 0 at the start.

`add_lora(model, LoraConfig(...))` swaps the chosen linears of any family for `LoraLinear`s that keep the
base's parameter objects and names (`...q_proj.weight`) and add `...q_proj.lora_A.weight` /
`...lora_B.weight`; everything else in the model is frozen. The base weights need no gradient and no
optimizer state, so a step costs the plain linear plus two thin GEMMs. Adapters switch off
(`lora_enabled(model, False)`: the base model, e.g. PPO's reference, with no second copy), merge into W
for export and unmerge. `save_adapter` / `load_adapter` use PEFT's format (adapter_config.json +
adapter_model.safetensors with PEFT's key names), so `peft.PeftModel.from_pretrained(hf_model, dir)` loads
ours and we load PEFT's."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fastrlhf import ops
from fastrlhf.io.safetensors import read_safetensors
from fastrlhf.models.families import arch_of
from fastrlhf.models.transformer import CausalLM, Linear

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model: base_model (LoraModel) .model (the LM)


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the update; 0 = no adapters (a trainer's [lora] table then means full fine-tuning)."""
    alpha: float = 32.0
    """The update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path sees x unchanged)."""
    targets: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    """Names of the linears to adapt (the last part of the module name); GPT-2's are c_attn, c_proj, c_fc."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ValueError(f"lora.r must be an int >= 0 (0 = no LoRA); got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a finite number > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1); got {self.dropout!r}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one linear layer")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoraLinear(Linear):
    """A Linear with a LoRA update; weight and bias are the base's own (frozen) parameters."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: names and ties kept
        self.lora_A = nn.Linear(self.in_features, cfg.r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's and loralib's default
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.dtype), self.lora_B.to(base.weight.dtype)
        self.scale = cfg.scale
        self.drop = nn.Dropout(cfg.dropout)
        self.enabled, self.merged = True, False

    def forward(self, x: Tensor) -> Tensor:
        y = ops.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            a = ops.linear(self.drop(x), self.lora_A.weight)  # (..., r)
            y = y + ops.linear(a, self.lora_B.weight) * self.scale
        return y

    def delta(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


def add_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Swap every linear named in cfg.targets (and no other) for a LoraLinear, freeze all the rest;
    returns the adapted modules' names. The LM head is never adapted. The model keeps cfg as
    `model.lora_config` (its checkpoint record carries it, models/load.py)."""
    if cfg.r < 1:
        raise ValueError(f"lora.r must be >= 1 to add adapters; got {cfg.r}")
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and name.rsplit(".", 1)[-1] in cfg.targets
        and not isinstance(m, LoraLinear)
    ]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.targets {cfg.targets} match no linear layer of the model; its linears: {names}"
        )
    model.requires_grad_(False)
    for name, m in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoraLinear(m, cfg))
    model.lora_config = cfg
    return [n for n, _ in found]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put plain Linears back (PEFT's merge_and_unload): the
    model a full fine-tuning would give, every parameter trainable again."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]:
        m.merge()
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the merged base parameters themselves, no copy
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model.requires_grad_(True)


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def lora_enabled(model: nn.Module, on: bool) -> None:
    """Switch every adapter on or off (off = the base model, e.g. PPO's reference)."""
    for m in lora_layers(model):
        m.enabled = on


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The base model for the block's duration (PPO's and GRPO's reference with no second copy)."""
    layers = lora_layers(model)
    was = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, was):
            m.enabled = on


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter of an adapted model's CausalLM(s) but the adapters (after a requires_grad_(True)
    on a model whose other parts, e.g. a scalar head, train)."""
    for m in model.modules():
        if isinstance(m, CausalLM) and lora_layers(m):
            for name, q in m.named_parameters():
                q.requires_grad_(".lora_A." in name or ".lora_B." in name)


def share_base(model: nn.Module, donor: nn.Module) -> bool:
    """Point every non-adapter parameter of `model` (e.g. a LoRA reward model's trunk) at `donor`'s parameter
    of the same path (the policy, whose base is the same frozen model), so both hold one copy of the base.
    Tied weights stay tied. Nothing changes and False comes back unless every such parameter has a donor of
    the same shape and values (within float rounding of two merges of the same adapters). While shared, the
    donor's base must stay frozen and unmerged: a merge writes into the tensors both models read."""
    pairs = []
    for path, m in model.named_modules():
        for name, q in m._parameters.items():  # every holder of a tied weight, not only the first
            if q is None or isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
                continue
            try:
                d = donor.get_submodule(path)._parameters.get(name)
            except AttributeError:
                return False
            if d is None or d.shape != q.shape or not torch.allclose(d, q, rtol=1e-5, atol=1e-6):
                return False
            pairs.append((m, name, d))
    for m, name, d in pairs:
        m._parameters[name] = d
    return True


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under our names (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: CausalLM, cfg: LoraConfig, folder: str | os.PathLike, base_model: str = "") -> Path:
    """PEFT's adapter folder: adapter_config.json + adapter_model.safetensors (keys base_model.model.<name>)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapter_state(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save (add_lora first)")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "bias": "none",
        "fan_in_fan_out": arch_of(model.config) == "gpt2",  # HF's GPT-2 uses Conv1D: weights are (in, out)
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")
    return folder


def load_adapter(model: CausalLM, folder: str | os.PathLike) -> LoraConfig:
    """Add and fill the adapters of a PEFT (or our) adapter folder; returns its LoraConfig."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: adapter_config.json is missing")
    d = json.loads(path.read_text())
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only 'LORA')")
    for key, off in (("use_dora", False), ("use_rslora", False), ("bias", "none")):
        if d.get(key, off) != off:
            raise ValueError(f"{path}: {key} = {d[key]!r} is not supported")
    targets = d["target_modules"]
    cfg = LoraConfig(
        r=d["r"],
        alpha=float(d["lora_alpha"]),
        dropout=float(d.get("lora_dropout", 0.0)),
        targets=[targets] if isinstance(targets, str) else list(targets),
    )
    add_lora(model, cfg)
    raw = read_safetensors(folder / "adapter_model.safetensors")
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in raw.items()}
    own = adapter_state(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{folder}: adapter tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            + "wrong shapes "
            + "; ".join(f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
        )
    model.load_state_dict(tensors, strict=False)
    return cfg
