"""Checkpoints every trainer shares: one folder per save, written under a temporary name and renamed
into place (a crash never leaves a half-written checkpoint), then a `latest` pointer replaced atomically.

    <run>/step_000200/  <model>.safetensors   weights of each model (tied lm_head stored once)
                        trainer.safetensors   optimizer tensors and RNG states
                        state.json            step, configs, optimizer hyper-parameters, extra, sha256 of files
                        tokenizer/            the tokenizer the run used (so samples decode the same)
    <run>/latest        name of the newest complete checkpoint

A write that fails (a full disk) removes its temporary folder; one a kill interrupted is removed by the
run's next start (remove_partial). Weights that are not finite are refused, so rotation never replaces a
good checkpoint with a broken one, and never removes the checkpoint it has just written. No pickle
anywhere: tensors go to safetensors, everything else to JSON."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastrlhf.io.files import atomic_write_text
from fastrlhf.io.safetensors import read_safetensors, sha256_file

STATE_FILE, TRAINER_FILE, LATEST = "state.json", "trainer.safetensors", "latest"


def _optimizer_to_parts(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{name}.state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_parts(
    name: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}.state."
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[field] = value
    for key, value in meta["scalars"].items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    if len(groups) != len(opt.param_groups) or any(
        len(g["params"]) != len(o["params"]) for g, o in zip(groups, opt.param_groups)
    ):
        raise ValueError(f"optimizer {name!r} in the checkpoint has other parameter groups than the model's")
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    state: dict[str, Any] | None = None,
    tokenizer: Any = None,
    keep: int = 2,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write <run_dir>/step_<step>/ atomically, point `latest` at it, keep only the newest `keep`.
    models need .weights() (a CausalLM, ScalarHeadModel); state is any JSON-able dict (configs, counters);
    record describes what model.safetensors holds (model_record), read back by read_model_record.
    One writer: under torchrun, train.dist.save_checkpoint has rank 0 call this and the others wait."""
    run_dir, name = Path(run_dir), f"step_{step:07d}"
    weights = {mname: model.weights() for mname, model in models.items()}
    for mname, tensors in weights.items():
        bad = next(
            (k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())), None
        )
        if bad is not None:
            raise ValueError(f"{mname} tensor {bad!r} is not finite: refusing to write {run_dir / name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{name}."))
    try:
        final = _write(run_dir, name, tmp, step, weights, optimizers, generators, state, tokenizer, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or Ctrl-C leaves no partial folder behind
        raise
    atomic_write_text(run_dir / LATEST, name + "\n")
    older = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p != final)
    for old in older[: max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(
    run_dir: Path,
    name: str,
    tmp: Path,
    step: int,
    weights: dict[str, dict[str, Tensor]],
    optimizers: dict[str, torch.optim.Optimizer] | None,
    generators: dict[str, torch.Generator] | None,
    state: dict[str, Any] | None,
    tokenizer: Any,
    record: dict[str, Any] | None,
) -> Path:
    """save_checkpoint's files into tmp, then tmp renamed to run_dir/name."""
    from safetensors.torch import save_file

    trainer: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        trainer.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for gname, gen in (generators or {}).items():
        trainer[f"rng.{gname}"] = gen.get_state()
    meta: dict[str, Any] = {"step": step, "state": state or {}, "optimizers": {}, "files": {}}
    if record is not None:
        meta["model"] = record
    for oname, opt in (optimizers or {}).items():
        tensors, meta["optimizers"][oname] = _optimizer_to_parts(oname, opt)
        trainer.update(tensors)
    for mname, tensors in weights.items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{mname}.safetensors"
        )
    save_file(trainer, tmp / TRAINER_FILE)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    for f in sorted(tmp.glob("*.safetensors")):
        meta["files"][f.name] = sha256_file(f)
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
    final = run_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def remove_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary `.step_*` folders of checkpoint writes that never finished (a kill mid-write);
    only the run's one writer (the lock's holder) may call this. Returns what it removed."""
    partial = sorted(p for p in Path(run_dir).glob(".step_*") if p.is_dir())
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


HEADS = ("lm", "scalar")  # a language model (LM head), or a reward/value model (a scalar head on the trunk)


def model_record(arch: str, config: dict[str, Any], head: str) -> dict[str, Any]:
    """The record every trainer writes beside model.safetensors: the family (`arch`, e.g. 'gpt2' or
    'llama'), its config as plain data, and its head."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}; got {head!r}")
    return {"arch": arch, "config": config, "head": head}


def read_model_record(meta: dict[str, Any], where: str | os.PathLike = "the checkpoint") -> dict[str, Any]:
    """The model record of a checkpoint's state.json, also for checkpoints written before the record
    existed: the reward model's `state.model` and every other trainer's `state.config.model` (GPT-2)."""
    if "model" in meta:
        return meta["model"]
    state = meta.get("state", {})
    if isinstance(state.get("model"), dict):  # the RM, before the record
        return model_record("gpt2", state["model"], "scalar")
    if isinstance(state.get("config", {}).get("model"), dict):  # pretrain, SFT, PPO, before the record
        return model_record("gpt2", state["config"]["model"], "lm")
    raise ValueError(f"{where} records no model (no 'model' record in its {STATE_FILE})")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names; without `latest` (lost, or a kill between the rename and the
    pointer), the newest complete step folder (renamed into place only once complete); None for neither."""
    pointer = Path(run_dir) / LATEST
    if pointer.is_file():
        return Path(run_dir) / pointer.read_text().strip()
    steps = sorted(p for p in Path(run_dir).glob("step_*") if (p / STATE_FILE).is_file())
    return steps[-1] if steps else None


def read_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """state.json of a checkpoint folder (step, state, optimizers, files), with a clear error if absent."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint folder: {STATE_FILE} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupted: {exc}") from exc


def read_verified(ckpt: Path, filename: str, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Tensors of ckpt/filename after checking its sha256 against state.json (catches truncation/bit rot)."""
    path = ckpt / filename
    want = meta["files"].get(filename)
    if want is not None and path.is_file() and sha256_file(path) != want:
        raise ValueError(
            f"{path} is corrupted or truncated: its sha256 differs from the one recorded at save time"
        )
    return read_safetensors(path)


def load_checkpoint(
    ckpt: str | os.PathLike,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load what save_checkpoint wrote into the given objects; returns state.json's contents."""
    ckpt = Path(ckpt)
    meta = read_state(ckpt)
    for mname, model in models.items():
        model.load_weights(
            read_verified(ckpt, f"{mname}.safetensors", meta), source=str(ckpt / f"{mname}.safetensors")
        )
    if optimizers or generators or restore_rng:
        trainer = read_verified(ckpt, TRAINER_FILE, meta)
        for oname, opt in (optimizers or {}).items():
            _optimizer_from_parts(oname, opt, trainer, meta["optimizers"][oname])
        for gname, gen in (generators or {}).items():
            gen.set_state(trainer[f"rng.{gname}"])
        if restore_rng:
            torch.set_rng_state(trainer["rng.torch"])
            cuda = [trainer[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in trainer))]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    return meta


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (whose `latest` is used)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} holds neither a checkpoint ({STATE_FILE}) nor a run ({LATEST})")
    return latest
