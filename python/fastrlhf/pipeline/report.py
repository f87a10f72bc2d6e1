"""runs/NAME/report.md: the goals, a table per stage, SFT-vs-RL samples on the same held-out prompts (every
RL algorithm the run trained side by side), and PNG plots (matplotlib) of the losses, the reward model's
accuracy, PPO's reward, KL and entropy, and the critic-free algorithms' rewards. Written from the stages'
logs alone, so it can be rebuilt at any time; missing stages are left out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastrlhf.pipeline.config import ALGOS, CRITIC_FREE, STAGES
from fastrlhf.tasks.registry import task_module
from fastrlhf.train.log import read_jsonl


def _rows(path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every log line of `path` that has `key`."""
    if not path.is_file():
        return []
    return [(r.get("step", 0), r[key]) for r in read_jsonl(path) if r.get(key) is not None]


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def _cell(text: str, n: int = 90) -> str:
    text = text if len(text) <= n else text[: n - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ⏎ ") or "(empty)"


def _plot(
    out: Path,
    name: str,
    title: str,
    series: dict[str, list[tuple[int, float]]],
    xlabel: str,
    hline: tuple[str, float] | None = None,
) -> str | None:
    """One PNG of step-value series; returns its markdown, or None when there is nothing to draw."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=label, lw=1.2)
    if hline is not None:
        ax.axhline(hline[1], color="gray", ls="--", lw=1, label=hline[0])
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / f"{name}.png")
    plt.close(fig)
    return f"![{title}](plots/{name}.png)"


def _name(algo: str) -> str:
    return {"reinforce_pp": "REINFORCE++", "base": "base model"}.get(algo, algo.upper())


def _evaluated(metrics: dict[str, float]) -> list[str]:
    """The RL algorithms the eval compared with SFT, in ALGOS order."""
    return [a for a in ALGOS if f"{a}_score" in metrics]


def _goals(run: Any, metrics: dict[str, float], rm_acc: float) -> list[str]:
    goal = task_module(run.cfg.run.task).GOAL
    what, gain, rm_goal = goal.metric, goal.min_gain, goal.rm_accuracy
    lines = ["| goal | measured | met |", "| --- | --- | --- |"]
    for algo in _evaluated(metrics):
        name, g = _name(algo), ("gain" if algo == "ppo" else f"{algo}_gain")
        delta = metrics[f"{algo}_score"] - metrics["sft_score"]
        # paired (same prompts, same seed); runs from before it was recorded fall back to the unpaired error
        sem = metrics.get(f"{g}_sem", math.hypot(metrics[f"{algo}_score_sem"], metrics["sft_score_sem"]))
        aim = (
            f"{name} {what} beats SFT's by >= {gain:g}" if gain > 1e-6 else f"{name} {what} higher than SFT's"
        )
        # a gain inside two standard errors may be noise: it is not called met
        met = delta >= gain and delta > 2 * sem
        lines.append(
            f"| {aim}, by more than 2 paired standard errors (held-out prompts) | SFT {metrics['sft_score']:.3f}, "
            f"{name} {metrics[f'{algo}_score']:.3f}: {delta:+.3f} ± {sem:.3f} (paired standard error) | "
            f"{'yes' if met else 'no'} |"
        )
        lines += _fluency(name, algo, metrics)
        if algo != "ppo":
            section = run.cfg.algo(algo)
            kl_name, kl_value = (
                ("dpo.beta", section.dpo.beta) if algo == "dpo" else section.hyper.kl_setting()
            )
            lines.append(
                f"| {name}: KL to the SFT model ({kl_name} {kl_value:g}) | "
                f"{metrics[f'{algo}_kl']:.3f} nats per answer | - |"
            )
            continue
        p = run.cfg.ppo.ppo
        if p.adaptive_kl:
            lines.append(
                f"| KL to the SFT model within the controller's target ({p.kl_target:g} nats) | "
                f"{metrics['ppo_kl']:.3f} nats per answer | {'yes' if metrics['ppo_kl'] <= p.kl_target else 'no'} |"
            )
        else:
            lines.append(
                f"| KL to the SFT model (fixed kl_coef {p.kl_coef:g}) | {metrics['ppo_kl']:.3f} nats per answer | - |"
            )
    if math.isfinite(rm_acc):
        lines.append(
            f"| reward model held-out pairwise accuracy >= {rm_goal:g} | {rm_acc:.3f} | "
            f"{'yes' if rm_acc >= rm_goal else 'no'} |"
        )
    total = sum((run.done(s) or {}).get("seconds", 0.0) for s in STAGES)
    lines.append(
        f"| whole pipeline in <= {goal.max_minutes:g} minutes (2 CPU cores) | {total / 60:.1f} min of stage "
        f"time | {'yes' if total <= 60 * goal.max_minutes else 'no'} |"
    )
    return lines


MAX_PERPLEXITY_RATIO, MIN_DISTINCT_RATIO = 1.5, 0.8
"""The fluency bars of an RL model's answers against SFT's: perplexity under the frozen base model at most
1.5x, distinct-2 at least 0.8x (answers that drift into lists of rewarded words fail one or both)."""


def _fluency(name: str, algo: str, metrics: dict[str, float]) -> list[str]:
    """The goal rows that check an RL model's answers stay English: its gain over the base model (when the
    run starts from one), perplexity under the frozen base and distinct-2, each against SFT's."""
    lines = []
    if f"{algo}_over_base" in metrics:
        lines.append(
            f"| {name} against the pretrained model the run started from (same prompts and draws) | base "
            f"{metrics['base_score']:.3f}, {name} {metrics[f'{algo}_score']:.3f}: {metrics[f'{algo}_over_base']:+.3f} "
            f"± {metrics[f'{algo}_over_base_sem']:.3f} | - |"
        )
    ppl, sft_ppl = metrics.get(f"{algo}_perplexity", math.nan), metrics.get("sft_perplexity", math.nan)
    if math.isfinite(ppl) and math.isfinite(sft_ppl):
        ratio = ppl / sft_ppl
        lines.append(
            f"| {name}: the frozen base model's perplexity of its answers <= {MAX_PERPLEXITY_RATIO:g}x SFT's | "
            f"SFT {sft_ppl:.2f}, {name} {ppl:.2f}: {ratio:.2f}x | {'yes' if ratio <= MAX_PERPLEXITY_RATIO else 'no'} |"
        )
    d, sft_d = metrics.get(f"{algo}_distinct2"), metrics.get("sft_distinct2")
    if d is not None and sft_d:
        ratio = d / sft_d
        lines.append(
            f"| {name}: distinct-2 of its answers >= {MIN_DISTINCT_RATIO:g}x SFT's | SFT {sft_d:.3f}, {name} "
            f"{d:.3f}: {ratio:.2f}x | {'yes' if ratio >= MIN_DISTINCT_RATIO else 'no'} |"
        )
    return lines


def write_report(run: Any) -> Path:
    import torch

    out, cfg = run.out, run.cfg
    logs = {s: run.dir(s) / "log.jsonl" for s in ("pretrain", "sft", "rm", *ALGOS)}
    critic_free = [a for a in CRITIC_FREE if logs[a].is_file()]
    eval_dir = run.dir("eval")
    metrics = (
        json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else {}
    )
    samples = read_jsonl(eval_dir / "samples.jsonl") if (eval_dir / "samples.jsonl").is_file() else []
    rm_acc = _rows(logs["rm"], "val_accuracy")
    trained = [a for a in ALGOS if logs[a].is_file()]
    md = [
        f"# fastrlhf pipeline: {cfg.run.task}" + (f" ({', '.join(map(_name, trained))})" if trained else ""),
        "",
        (
            f"Run folder `{out}`; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device "
            f"`{cfg.run.device}`. Settings: `config.json`. Rebuilt from the stage logs after every run."
        ),
        "",
        "## Goals",
        "",
        *_goals(run, metrics, rm_acc[-1][1] if rm_acc else math.nan),
        "",
        "## Stages",
        "",
        "| stage | seconds | summary |",
        "| --- | --- | --- |",
    ]
    for stage in STAGES:
        done = run.done(stage)
        if done is not None:
            summary = ", ".join(f"{k} {_fmt(v)}" for k, v in done["summary"].items())
            md.append(f"| {stage} | {done['seconds']:.0f} | {summary} |")
    md.append("")
    plots = [
        _plot(
            out,
            "losses",
            "language-model losses",
            {
                "pretrain train": _rows(logs["pretrain"], "loss"),
                "pretrain val": _rows(logs["pretrain"], "val_loss"),
                "SFT train": _rows(logs["sft"], "loss"),
                "SFT val": _rows(logs["sft"], "val_loss"),
            },
            "step",
        ),
        _plot(
            out,
            "rm_accuracy",
            "reward model: held-out pairwise accuracy",
            {"val_accuracy": rm_acc},
            "step",
            ("goal", task_module(cfg.run.task).GOAL.rm_accuracy),
        ),
        _plot(
            out,
            "reward",
            "PPO: reward per episode",
            {
                "RM score": _rows(logs["ppo"], "score_mean"),
                "RM score - KL penalty": _rows(logs["ppo"], "rlhf_reward"),
            },
            "PPO step",
        ),
        _plot(
            out,
            "kl",
            "PPO: KL to the SFT model (nats per episode)",
            {"kl": _rows(logs["ppo"], "kl")},
            "PPO step",
            ("kl_target", cfg.ppo.ppo.kl_target) if cfg.ppo.ppo.adaptive_kl else None,
        ),
        _plot(
            out,
            "entropy",
            "PPO: policy entropy (nats per token)",
            {"entropy": _rows(logs["ppo"], "entropy")},
            "PPO step",
        ),
        _plot(
            out,
            "true_score",
            "PPO: true score of the rollouts (never trained on)",
            {"true_score": _rows(logs["ppo"], "true_score")},
            "PPO step",
        ),
        _plot(
            out,
            "critic_free",
            "critic-free RL: true score of the rollouts (the task's scorer)",
            {_name(a): _rows(logs[a], "true_score") for a in critic_free},
            "step",
        ),
    ]
    md += ["## Plots", ""] + [p + "\n" for p in plots if p]
    if logs["ppo"].is_file():
        last = read_jsonl(logs["ppo"])[-10:]
        keys = (
            "score_mean",
            "rlhf_reward",
            "kl",
            "kl_coef",
            "entropy",
            "clipfrac",
            "approx_kl",
            "explained_variance",
            "response_length",
            "eos_frac",
            "time_generate",
            "time_score",
            "time_train",
        )
        keys = ("true_score", *keys) if any("true_score" in r for r in last) else keys
        md += [
            "## PPO, mean of the last 10 logged steps",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + " --- |" * len(keys),
            "| " + " | ".join(_fmt(sum(r.get(k) or 0.0 for r in last) / len(last)) for k in keys) + " |",
            "",
        ]
    for algo in critic_free:
        md += _last_steps(algo, logs[algo])
    if metrics:
        md += [
            "## Evaluation on held-out prompts",
            "",
            "| model | true score | reward model | KL to SFT | length | base-model perplexity | distinct-2 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        base = ("base",) if "base_score" in metrics else ()
        for who in (*base, "sft", *_evaluated(metrics)):
            md.append(
                f"| {_name(who)} | "
                + " | ".join(
                    f"{metrics[f'{who}_{k}']:.3f} ± {metrics[f'{who}_{k}_sem']:.3f}"
                    for k in ("score", "reward", "kl", "length")
                )
                + f" | {_fmt(metrics.get(f'{who}_perplexity', math.nan))} | "
                + f"{_fmt(metrics.get(f'{who}_distinct2', math.nan))} |"
            )
        md.append("")
    if samples:
        models = [k for k in samples[0] if k != "prompt"]  # (the base model,) SFT, then the RL models
        md += [
            f"## Samples (the first {cfg.eval.samples} held-out prompts, the same sampling seed for every model)",
            "",
            "| prompt | " + " | ".join(f"{_name(m)} answer | score" for m in models) + " |",
            "|" + " --- |" * (1 + 2 * len(models)),
        ]
        for r in samples[: cfg.eval.samples]:
            cells = [f"{_cell(r[m]['response'])} | {r[m]['score']:.2f}" for m in models]
            md.append(f"| {_cell(r['prompt'], 60)} | " + " | ".join(cells) + " |")
        md.append("")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _last_steps(algo: str, log: Path) -> list[str]:
    """A critic-free algorithm's training metrics, the mean of its last 10 logged steps."""
    last = [r for r in read_jsonl(log) if "reward_mean" in r][-10:]
    if not last:
        return []
    keys = ("true_score", "reward_mean", "reward_std", "kl_ref", "approx_kl", "entropy", "clipfrac_low")
    keys += (
        "clipfrac_high",
        "zero_variance_frac",
        "response_length",
        "time_generate",
        "time_score",
        "time_train",
    )
    keys = tuple(k for k in keys if any(k in r for r in last))
    mean = [_fmt(sum(r.get(k) or 0.0 for r in last) / len(last)) for k in keys]
    return [
        f"## {_name(algo)}, mean of the last 10 logged steps",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + " --- |" * len(keys),
        "| " + " | ".join(mean) + " |",
        "",
    ]
