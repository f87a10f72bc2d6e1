"""The pipeline's settings: one section per stage (the trainers' own configs for pretrain, sft, rm, ppo and
the critic-free grpo, rloo and reinforce_pp),
the run's task and its options (the table named after the task), loaded as code defaults, then the task's
defaults (tasks/<task>.toml), then a TOML file, then command-line overrides; and the fingerprint of each
stage's settings that lets a rerun skip, resume or refuse a stage."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastrlhf.config import check_range, from_dict, merge, parse_overrides, to_dict
from fastrlhf.models.load import is_pretrained_source, is_run_folder
from fastrlhf.rl.config import PPOConfig
from fastrlhf.rl.grpo import GRPOConfig
from fastrlhf.rl.reinforce_pp import ReinforcePPConfig
from fastrlhf.rl.rewards import parse_reward
from fastrlhf.rl.rloo import RLOOConfig
from fastrlhf.tasks.registry import task_defaults, task_module, task_names, task_options
from fastrlhf.train.dpo import DPOConfig
from fastrlhf.train.pretrain import PretrainConfig
from fastrlhf.train.reward import RMConfig
from fastrlhf.train.sft import SFTConfig

ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")
"""The algorithms `--algo` picks, each a stage after sft: after label and rm when it reads the reward model,
after label only for DPO (it trains on the label stage's rankings, no reward model)."""
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")
OPTIONAL = (*CRITIC_FREE, "dpo")  # the sections a run's config.json holds only when chosen
STAGES = ("data", "pretrain", "sft", "label", "rm", *ALGOS, "eval")
_RECIPE = ("data", "pretrain", "sft", "label", "rm", "ppo")  # the fingerprint chain of the original recipe
# fields that change how a stage runs, not what it makes: editing them never invalidates a stage
_RUNTIME_FIELDS = {"device", "threads", "max_minutes", "log_interval", "tensorboard", "dtype"}


@dataclass
class RunSection:
    task: str = "sentiment"
    """A task of fastrlhf/tasks (`python -m fastrlhf pipeline --help` lists them); its options are the
    table named after it, e.g. [arithmetic]."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' for every stage."""
    threads: int = 0
    """torch CPU threads for every stage; 0 = torch's default."""
    model: str = ""
    """A pretrained model to start from (HF folder, .gguf file, 'smollm2-135m-instruct'): no pretrain stage,
    the data stage tokenizes with the model's tokenizer, SFT fine-tunes the model (its chat template kept).
    "" = pretrain a small GPT on the task's text first."""


@dataclass
class DataStage:
    corpus: str = ""
    """A UTF-8 text file to pretrain on (and the source of a corpus task's prompts); "" = the task's own."""
    vocab_size: int = 2048
    """Byte-level BPE vocabulary trained on the corpus."""
    split_digits: bool = False
    """Every digit its own token (merged numbers like "37" hide place values)."""
    val_fraction: float = 0.05
    """Tail of the token stream kept for the pretraining validation loss."""


@dataclass
class LabelStage:
    k: int = 4
    """Answers sampled and ranked per prompt."""
    train_prompts: int = 2048
    """Train prompts labeled for the reward model."""
    heldout_prompts: int = 256
    """Held-out prompts labeled for the reward model's held-out accuracy."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    batch_prompts: int = 32
    """Prompts sampled together (x K rows)."""
    seed: int = 0


@dataclass
class EvalStage:
    prompts: int = 256
    """Held-out prompts answered by the SFT model and each RL model (same prompts, same sampling seed; the
    sampling settings are [ppo.ppo]'s temperature and max_new_tokens, whichever algorithms ran)."""
    samples: int = 12
    """Rows of the report's SFT-vs-RL sample table."""
    batch: int = 64
    seed: int = 0


def _ppo_defaults() -> PPOConfig:
    cfg = PPOConfig()
    p = cfg.ppo
    p.rollout_batch, p.minibatch, p.ppo_epochs, p.max_new_tokens = 32, 16, 2, 16
    p.adaptive_kl, p.kl_coef, p.kl_target, p.kl_horizon = True, 0.1, 6.0, 256
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 3e-4, 3e-5, 10
    cfg.train.max_steps, cfg.train.ckpt_interval, cfg.train.max_minutes = 300, 25, 5.0
    return cfg


def _pretrain_defaults() -> PretrainConfig:
    cfg = PretrainConfig()
    m, t = cfg.model, cfg.train
    m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout = 2048, 64, 4, 4, 128, 0.0
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 3e-3, 3e-4, 30
    t.max_steps, t.batch_size, t.eval_interval, t.eval_batches, t.ckpt_interval, t.max_minutes = (
        800,
        32,
        200,
        8,
        100,
        6.0,
    )
    return cfg


def _sft_defaults() -> SFTConfig:
    cfg = SFTConfig()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1e-3, 1e-4, 20
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.ckpt_interval, t.max_minutes = 300, 16, 100, 100, 2.0
    return cfg


def _rm_defaults() -> RMConfig:
    cfg = RMConfig()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 3e-4, 3e-5, 20
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.ckpt_interval, t.max_minutes = 300, 16, 100, 100, 2.5
    return cfg


def _critic_free_defaults(cls: type) -> Any:
    """A critic-free algorithm on the pipeline's task, its exact scorer as the reward (no label or rm stage);
    'rm' in train.reward names the run's reward model. At most 5 minutes on 2 CPU cores, as the PPO stage: 3000
    steps fit there on arithmetic (GRPO 217 s on one thread: 30.9 % -> 70.1 % held-out; 300 steps gave +4)."""
    cfg = cls()
    h = cfg.hyper
    h.prompts_per_step, h.group_size, h.minibatch, h.max_new_tokens = 8, 4, 16, 16
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1e-4, 1e-5, 5
    cfg.train.max_steps, cfg.train.ckpt_interval, cfg.train.max_minutes = 3000, 250, 5.0
    return cfg


def _dpo_defaults() -> DPOConfig:
    """DPO on the label stage's rankings from the SFT model: configs/dpo_sentiment.toml's settings
    (one epoch of the 2048 train rankings; held-out VADER +0.41 over SFT there)."""
    cfg = DPOConfig()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1e-4, 1e-5, 10
    cfg.data.overlong = "truncate"
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.ckpt_interval, t.max_minutes = 256, 8, 64, 64, 10.0
    return cfg


@dataclass
class PipelineConfig:
    """Every stage's settings; the defaults fit 2 CPU cores and 20 minutes for the sentiment task."""

    run: RunSection = field(default_factory=RunSection)
    data: DataStage = field(default_factory=DataStage)
    pretrain: PretrainConfig = field(default_factory=_pretrain_defaults)
    sft: SFTConfig = field(default_factory=_sft_defaults)
    label: LabelStage = field(default_factory=LabelStage)
    rm: RMConfig = field(default_factory=_rm_defaults)
    ppo: PPOConfig = field(default_factory=_ppo_defaults)
    grpo: GRPOConfig = field(default_factory=lambda: _critic_free_defaults(GRPOConfig))
    rloo: RLOOConfig = field(default_factory=lambda: _critic_free_defaults(RLOOConfig))
    reinforce_pp: ReinforcePPConfig = field(default_factory=lambda: _critic_free_defaults(ReinforcePPConfig))
    dpo: DPOConfig = field(default_factory=_dpo_defaults)
    eval: EvalStage = field(default_factory=EvalStage)
    options: Any = None
    """The task's Options (its [<task>] table); None = the task's defaults."""

    def __post_init__(self) -> None:
        task_module(self.run.task)  # an unknown task is named with the valid ones
        m = self.run.model  # refused before any stage runs, not at the data stage's tokenizer
        if m and not (is_pretrained_source(m) or is_run_folder(m)):
            raise ValueError(
                f"run.model {m!r} is neither a Hugging Face model folder (config.json + safetensors), a .gguf "
                f"file, a known name ('smollm2-135m-instruct') nor a fastrlhf run folder"
            )
        if self.options is None:
            self.options = task_options(self.run.task)
        check_range("data.vocab_size", self.data.vocab_size, 257, 65536)
        check_range("data.val_fraction", self.data.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("label.k", self.label.k, 2, 16)
        for name in ("train_prompts", "heldout_prompts", "max_new_tokens", "batch_prompts"):
            check_range(f"label.{name}", getattr(self.label, name), 1, float("inf"))
        check_range("label.temperature", self.label.temperature, 0.0, float("inf"), lo_open=True)
        for name in ("prompts", "batch"):
            check_range(f"eval.{name}", getattr(self.eval, name), 1, float("inf"))
        check_range("eval.samples", self.eval.samples, 0, self.eval.prompts)

    def algo(self, name: str) -> Any:
        """The config section of RL algorithm `name` (one of ALGOS)."""
        return getattr(self, name)


def check_algos(algos: tuple[str, ...]) -> tuple[str, ...]:
    """algos in ALGOS order, each known, at least one."""
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise ValueError(f"--algo must be one or more of {list(ALGOS)} (comma-separated); got {list(algos)}")
    return tuple(a for a in ALGOS if a in algos)


def needs_rm(cfg: PipelineConfig, algo: str) -> bool:
    """Whether an algorithm reads the run's reward model (PPO always; a critic-free one when its
    train.reward has an 'rm' term)."""
    if algo in ("ppo", "dpo"):
        return algo == "ppo"
    return any(src == "rm" for _, src in parse_reward(cfg.algo(algo).train.reward))


def inputs(cfg: PipelineConfig, algo: str) -> tuple[str, ...]:
    """The stages between sft and an RL algorithm's own that it reads: label and rm for one that reads the
    reward model, label's rankings for DPO, none otherwise."""
    if algo == "dpo":
        return ("label",)
    return ("label", "rm") if needs_rm(cfg, algo) else ()


def run_stages(cfg: PipelineConfig, algos: tuple[str, ...]) -> tuple[str, ...]:
    """The stages the algorithms need, in STAGES order."""
    needed = {"data", "sft", "eval", *algos, *(s for a in algos for s in inputs(cfg, a))}
    needed |= set() if cfg.run.model else {"pretrain"}  # a pretrained model needs no pretraining
    return tuple(s for s in STAGES if s in needed)


def requires(cfg: PipelineConfig, stage: str, algos: tuple[str, ...]) -> tuple[str, ...]:
    """The stages `stage` builds on (eval: those of the algorithms it compares), in STAGES order."""
    if stage == "eval":
        return run_stages(cfg, algos)[:-1]
    if stage in ALGOS:
        return tuple(s for s in run_stages(cfg, (stage,)) if s not in (stage, "eval"))
    return tuple(s for s in _RECIPE[: _RECIPE.index(stage)] if not (s == "pretrain" and cfg.run.model))


def config_data(cfg: PipelineConfig, algos: tuple[str, ...] = ALGOS) -> dict[str, Any]:
    """cfg as plain data, the task's options under the task's name (what config.json holds), with the
    critic-free sections of `algos` only (a PPO run's config.json is the recipe's)."""
    d = to_dict(cfg)
    d[cfg.run.task] = d.pop("options")
    for algo in OPTIONAL:
        if algo not in algos:
            del d[algo]
    return d


def load_pipeline_config(
    task: str, path: str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """The code defaults, then the task's defaults (tasks/<task>.toml), then the TOML file, then the
    command-line overrides."""
    if task not in task_names():
        raise ValueError(f"--task must be one of {task_names()}; got {task!r}")
    data = merge(config_data(PipelineConfig(run=RunSection(task=task))), task_defaults(task))
    if path is not None:
        try:
            data = merge(data, tomllib.loads(Path(path).read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    return config_from_dict(merge(data, parse_overrides([*(overrides or []), f"run.task={task}"])))


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    """A PipelineConfig from plain data (a merged TOML, a run's config.json); errors name the section.
    Tables named after other tasks are dropped (a run's config.json from before carries them all)."""
    data = dict(data)
    task = data.get("run", {}).get("task", RunSection.task)
    if task not in task_names():
        raise ValueError(f"run.task must be one of {task_names()}; got {task!r}")
    options = task_options(task, data.pop(task, None))
    for other in task_names():
        data.pop(other, None)
    known = [f for f in PipelineConfig.__dataclass_fields__ if f != "options"]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {sorted(known)}")
    sections = {}
    for name in known:
        cls = PipelineConfig.__dataclass_fields__[name].default_factory().__class__
        try:
            sections[name] = from_dict(cls, data.get(name, {}))
        except ValueError as exc:  # the trainers' checks name fields relative to their own config
            raise ValueError(f"[{name}] {exc}") from None
    return PipelineConfig(**sections, options=options)


def _settings(section: Any) -> Any:
    """A config section as plain data without the fields that only change how a stage runs."""
    if isinstance(section, dict):  # a [lora] table left off (r = 0) hashes as before the table existed
        return {
            k: _settings(v)
            for k, v in section.items()
            if k not in _RUNTIME_FIELDS and not (k == "lora" and v.get("r") == 0)
        }
    return section


def _hash(chain: str, settings: Any) -> str:
    return hashlib.sha256((chain + json.dumps(_settings(settings), sort_keys=True)).encode()).hexdigest()


def fingerprints(cfg: PipelineConfig, algos: tuple[str, ...] = ("ppo",)) -> dict[str, str]:
    """Per stage, a hash of its own settings and of every stage it builds on (a change upstream redoes it):
    the recipe's stages (data .. ppo) chain in order; a critic-free stage builds on rm when it reads the RM,
    else on sft; eval on the algorithms it compares (`algos`). The task's options belong to the data stage,
    but those its Options.LABEL_FIELDS names to the label stage."""
    d = to_dict(cfg)
    options, label_fields = d.pop("options"), type(cfg.options).LABEL_FIELDS
    task, label = [d["run"]["task"], *([d["run"]["model"]] if d["run"]["model"] else [])], d["label"]
    if options:
        late = [options.pop(k) for k in label_fields]
        task, label = [*task, options], ([label, *late] if late else label)
    own = {
        "data": [*task, d["data"]],
        "pretrain": d["pretrain"],
        "sft": d["sft"],
        "label": label,
        "rm": d["rm"],
        "ppo": d["ppo"],
    }
    out, chain = {}, ""
    for stage in _RECIPE:
        out[stage] = chain = _hash(chain, own[stage])
    for algo in CRITIC_FREE:
        out[algo] = _hash(out["rm" if needs_rm(cfg, algo) else "sft"], d[algo])
    out["dpo"] = _hash(out["label"], d["dpo"])
    sampling = d["ppo"]["ppo"]
    if algos == ("ppo",):  # the recipe's eval, fingerprinted as it always was
        out["eval"] = _hash(out["ppo"], [d["eval"], sampling["temperature"]])
    else:
        upstream = "".join(out[a] for a in algos)
        out["eval"] = _hash(
            upstream, [d["eval"], sampling["temperature"], sampling["max_new_tokens"], list(algos)]
        )
    return {stage: h[:16] for stage, h in out.items()}
