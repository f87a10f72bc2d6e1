"""The pipeline's stages: each takes the Run (folder + config), wires the paths between stages into the
matching trainer's config, runs it, and returns a small summary for DONE.json and the report."""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from fastrlhf.pipeline.folder import Run
from fastrlhf.tasks.registry import load_task, task_module


def _runtime(section: Any, run: Run) -> None:
    """Every stage computes on the run's device and threads."""
    section.device, section.threads = run.cfg.run.device, run.cfg.run.threads


def _bars(quiet: bool) -> bool:
    """Progress bars only on a terminal, as the trainers' own (a log file gets their summary lines)."""
    return not quiet and sys.stderr.isatty()


def _last(log: Path, key: str) -> float:
    from fastrlhf.train.log import read_jsonl

    values = [r[key] for r in read_jsonl(log) if r.get(key) is not None] if log.is_file() else []
    return values[-1] if values else math.nan


def _task(run: Run):
    return load_task(run.cfg.run.task, run.cfg.options, run.cfg.data.corpus)


def corpus_docs(run: Run) -> list[str]:
    """The pretraining documents: data.corpus, else the task's own text."""
    from fastrlhf.data import corpus

    if run.cfg.data.corpus:
        return corpus.read_texts([run.cfg.data.corpus])
    return _task(run).pretrain_documents()


def stage_data(run: Run, quiet: bool) -> dict[str, Any]:
    from fastrlhf.data import corpus
    from fastrlhf.data.formats import write_sft

    d, model = run.cfg.data, run.cfg.run.model
    docs = corpus_docs(run)
    if model:  # the pretrained model's own tokenizer: the task's text then feeds PPO-ptx in its ids
        from fastrlhf.models.load import load_pretrained_tokenizer

        tok = load_pretrained_tokenizer(model)
    else:
        tok = corpus.build_tokenizer("bpe", docs, d.vocab_size, split_digits=d.split_digits)
    meta = corpus.prepare(docs, tok, run.dir("data"), d.val_fraction)
    write_sft(run.dir("data") / "sft.jsonl", _task(run).demonstrations())  # what the SFT stage trains on
    return {k: meta[k] for k in ("documents", "characters", "train_tokens", "val_tokens", "vocab_size")}


def stage_pretrain(run: Run, quiet: bool) -> dict[str, Any]:
    from fastrlhf.data import TokenFile
    from fastrlhf.train.pretrain import pretrain

    cfg = copy.deepcopy(run.cfg.pretrain)
    _runtime(cfg.train, run)
    cfg.train.data_dir, cfg.train.out_dir = str(run.dir("data")), str(run.dir("pretrain"))
    vocab = TokenFile(run.dir("data") / "train.bin").vocab_size
    if cfg.model.vocab_size < vocab:
        raise ValueError(
            f"pretrain.model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"({vocab}); raise it or lower data.vocab_size"
        )
    last = pretrain(cfg, quiet=quiet)
    return {
        "steps": _last(run.dir("pretrain") / "log.jsonl", "step"),
        "loss": last.get("loss", math.nan),
        "val_loss": _last(run.dir("pretrain") / "log.jsonl", "val_loss"),
    }


def stage_sft(run: Run, quiet: bool) -> dict[str, Any]:
    from fastrlhf.train.sft import sft

    cfg = copy.deepcopy(run.cfg.sft)
    _runtime(cfg.train, run)
    cfg.data.source = str(run.dir("data") / "sft.jsonl")
    cfg.train.init_from = run.cfg.run.model or str(run.dir("pretrain"))
    cfg.train.out_dir = str(run.dir("sft"))
    last = sft(cfg, quiet=quiet)
    return {"loss": last.get("loss", math.nan), "val_loss": _last(run.dir("sft") / "log.jsonl", "val_loss")}


def stage_label(run: Run, quiet: bool) -> dict[str, Any]:
    from fastrlhf.labeling.answers import label_to_file
    from fastrlhf.labeling.labelers import ScoreLabeler
    from fastrlhf.models.load import load_model

    lab, task = run.cfg.label, _task(run)
    model, tok = load_model(run.dir("sft"))
    labeler = ScoreLabeler(run.cfg.run.task, task_module(run.cfg.run.task).preference)
    summary = {}
    for split, n, seed in (
        ("train", lab.train_prompts, lab.seed),
        ("heldout", lab.heldout_prompts, lab.seed + 1),
    ):
        prompts = task.prompts(split)[:n]
        stats, skipped = label_to_file(
            model,
            tok,
            prompts,
            labeler,
            run.dir("label") / f"{split}.jsonl",
            k=lab.k,
            batch_prompts=lab.batch_prompts,
            max_new_tokens=lab.max_new_tokens,
            seed=seed,
            temperature=lab.temperature,
            progress=_bars(quiet),
            desc=f"label {split}",
        )
        summary[f"{split}_rankings"], summary[f"{split}_skipped"] = stats.total, skipped
    return summary


def stage_rm(run: Run, quiet: bool) -> dict[str, Any]:
    from fastrlhf.train.reward import train_rm

    cfg = copy.deepcopy(run.cfg.rm)
    _runtime(cfg.train, run)
    cfg.train.sft, cfg.train.out_dir = str(run.dir("sft")), str(run.dir("rm"))
    cfg.data.train, cfg.data.val = (
        str(run.dir("label") / "train.jsonl"),
        str(run.dir("label") / "heldout.jsonl"),
    )
    last = train_rm(cfg, quiet=quiet)
    return {
        "loss": last.get("loss", math.nan),
        "val_accuracy": last.get("val_accuracy", math.nan),
        "val_loss": last.get("val_loss", math.nan),
    }


def stage_ppo(run: Run, quiet: bool) -> dict[str, Any]:
    from fastrlhf.rl.build import build_trainer

    cfg = copy.deepcopy(run.cfg.ppo)
    _runtime(cfg.train, run)
    prompts = run.dir("ppo") / "prompts.txt"  # train prompts only: held-out ones are for the evaluation
    prompts.write_text("".join(p.replace("\n", "\\n") + "\n" for p in _task(run).prompts("train")))
    cfg.models.policy, cfg.models.reward = str(run.dir("sft")), str(run.dir("rm"))
    cfg.train.prompts, cfg.train.out_dir = str(prompts), str(run.dir("ppo"))
    cfg.train.ptx_data = str(run.dir("data") / "train.bin") if cfg.ppo.ptx_coef > 0 else ""
    # the evaluation's true score (VADER, or 1/0 for a sum) of every rollout: logged, to see reward hacking
    history = build_trainer(cfg, quiet=quiet, true_score=task_module(run.cfg.run.task).score).train()
    tail = history[-10:]
    keys = ("true_score", "score_mean", "kl", "kl_coef", "entropy")
    return (
        {
            "steps": _last(run.dir("ppo") / "log.jsonl", "step"),
            **{k: sum(m[k] for m in tail) / len(tail) for k in keys},
        }
        if tail
        else {}
    )


def stage_critic_free(algo: str, run: Run, quiet: bool) -> dict[str, Any]:
    """GRPO, RLOO or REINFORCE++ from the SFT model on the task's train prompts; its reward is
    [<algo>.train] reward with 'task' = the task's exact scorer and 'rm' = this run's reward model."""
    from fastrlhf.rl.build import build_critic_free
    from fastrlhf.rl.rewards import parse_reward

    cfg = copy.deepcopy(run.cfg.algo(algo))
    _runtime(cfg.train, run)
    cfg.policy, cfg.train.prompts, cfg.train.out_dir = (
        str(run.dir("sft")),
        run.cfg.run.task,
        str(run.dir(algo)),
    )
    cfg.train.reward = " + ".join(
        f"{w!r} * {run.dir('rm') if src == 'rm' else src}" for w, src in parse_reward(cfg.train.reward)
    )
    score = task_module(run.cfg.run.task).score
    history = build_critic_free(
        cfg, quiet=quiet, lines=_task(run).prompts("train"), task_score=score, true_score=score
    ).train()
    tail = [m for m in history[-10:] if math.isfinite(m.get("reward_mean", math.nan))]
    keys = ("true_score", "reward_mean", "approx_kl", "entropy", "zero_variance_frac")
    return (
        {
            "steps": _last(run.dir(algo) / "log.jsonl", "step"),
            **{k: sum(m[k] for m in tail) / len(tail) for k in keys},
        }
        if tail
        else {}
    )


def _mean_sem(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n))."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return mean, std / math.sqrt(len(values))


def gain_key(algo: str) -> str:
    """The metrics' name of an algorithm's paired gain over SFT ('gain' for PPO, as the recipe's reports)."""
    return "gain" if algo == "ppo" else f"{algo}_gain"


def eval_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and standard error of each model's score, reward, KL and length over answer_and_score's rows, the
    paired gain of each other model's true score over SFT's, and each model's perplexity under the frozen base
    model (exp of the mean NLL per answer token) and distinct-2 over all its answers."""
    from fastrlhf.pipeline.evaluate import distinct_n

    metrics = {}
    models = [k for k in rows[0] if k != "prompt"]  # (the base model,) sft, then the RL models
    for who in models:
        for key in ("score", "reward", "kl", "length"):
            metrics[f"{who}_{key}"], metrics[f"{who}_{key}_sem"] = _mean_sem([r[who][key] for r in rows])
        nll = sum(r[who].get("base_nll", math.nan) for r in rows)
        metrics[f"{who}_perplexity"] = math.exp(nll / max(sum(r[who]["length"] for r in rows), 1))
        metrics[f"{who}_distinct2"] = distinct_n([r[who]["response"] for r in rows], 2)
    # the same prompts and sampling seed for every model: the per-prompt differences give a paired error
    for who in (m for m in models if m != "sft"):
        g = gain_key(who)
        metrics[g], metrics[f"{g}_sem"] = _mean_sem([r[who]["score"] - r["sft"]["score"] for r in rows])
        if "base" in models and who != "base":  # against the pretrained model the run started from
            metrics[f"{who}_over_base"], metrics[f"{who}_over_base_sem"] = _mean_sem(
                [r[who]["score"] - r["base"]["score"] for r in rows]
            )
    return metrics


@torch.no_grad()
def stage_eval(run: Run, quiet: bool) -> dict[str, Any]:
    """The SFT model and each RL model the run compares answer the same held-out prompts with the same
    sampling seed; each answer gets the task's true score (VADER compound, or 1/0 for a right/wrong sum), the
    reward model's score (NaN without an rm stage), and its log-ratio to the SFT model summed over its tokens
    (a one-sample estimate of the sequence KL)."""
    from fastrlhf.pipeline.evaluate import answer_and_score

    e, task = run.cfg.eval, _task(run)
    prompts = task.prompts("heldout")[: e.prompts]
    rows = answer_and_score(run, prompts, progress=_bars(quiet))
    with open(run.dir("eval") / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = eval_metrics(rows)
    (run.dir("eval") / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    summary = {"prompts": len(rows), "sft_score": metrics["sft_score"]}
    for algo in run.algos:
        summary[f"{algo}_score"], summary[f"{algo}_kl"] = metrics[f"{algo}_score"], metrics[f"{algo}_kl"]
    return summary


def stage_dpo(run: Run, quiet: bool) -> dict[str, Any]:
    """DPO from the SFT model on the label stage's rankings (train; held-out for its val metrics)."""
    from fastrlhf.train.dpo import dpo

    cfg = copy.deepcopy(run.cfg.dpo)
    _runtime(cfg.train, run)
    cfg.policy, cfg.train.out_dir = str(run.dir("sft")), str(run.dir("dpo"))
    cfg.data.train, cfg.data.val = (
        str(run.dir("label") / "train.jsonl"),
        str(run.dir("label") / "heldout.jsonl"),
    )
    last = dpo(cfg, quiet=quiet)
    keys = ("loss", "accuracy", "val_accuracy", "val_reward_margin", "kl_ref")
    return {"steps": _last(run.dir("dpo") / "log.jsonl", "step"), **{k: last[k] for k in keys if k in last}}


STAGE_FUNCTIONS = {
    "data": stage_data,
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "label": stage_label,
    "rm": stage_rm,
    "ppo": stage_ppo,
    **{a: functools.partial(stage_critic_free, a) for a in ("grpo", "rloo", "reinforce_pp")},
    "dpo": stage_dpo,
    "eval": stage_eval,
}
