"""The whole recipe in one call (InstructGPT, arXiv 2203.02155, figure 2), on one machine: stages data
(corpus -> byte-level BPE -> token files), pretrain, sft, label (K sampled answers per prompt, ranked by the
task's scripted labeler), rm, then the RL algorithms `algos` names (ppo by default; grpo, rloo, reinforce_pp
critic-free, which with the task's exact reward need no label or rm stage), eval (SFT and every finished RL
stage on the same held-out prompts), then report.md with tables, samples and plots. A stage records a fingerprint of its settings when it starts and DONE.json when
it ends: a rerun skips finished stages and resumes an interrupted one from its last checkpoint (the
trainers resume on their own); a stage whose settings changed is refused (--redo STAGE redoes it and every
later stage). The stages wire the paths between them; every other field comes from the config."""

from __future__ import annotations

import time
from pathlib import Path

from fastrlhf.io.lock import RunLock
from fastrlhf.pipeline.config import (
    ALGOS,
    STAGES,
    PipelineConfig,
    check_algos,
    config_data,
    requires,
    run_stages,
)
from fastrlhf.pipeline.folder import Run, write_json
from fastrlhf.pipeline.report import write_report
from fastrlhf.pipeline.stages import STAGE_FUNCTIONS
from fastrlhf.train import dist


def run_pipeline(
    out: str | Path,
    cfg: PipelineConfig,
    *,
    algos: tuple[str, ...] = ("ppo",),
    until: str = "eval",
    redo: str = "",
    quiet: bool = False,
) -> Path:
    """Run (or resume) every stage `algos` needs up to `until`, then write the report; returns
    runs/NAME/report.md. The eval compares SFT with `algos` and every RL stage already finished in `out`."""
    if dist.launched():
        raise ValueError(
            "the pipeline runs in one process (its data and labeling stages are not distributed); "
            "launch the trainers themselves under torchrun instead (docs/distributed.md)"
        )
    algos = check_algos(algos)
    finished = [a for a in ALGOS if (Path(out) / a / "DONE.json").is_file()]
    run = Run(out, cfg, tuple(a for a in ALGOS if a in algos or a in finished))
    run.out.mkdir(parents=True, exist_ok=True)
    with RunLock(run.out, "pipeline"):  # a second pipeline on this folder stops here, naming this one
        return _run(run, algos, until, redo, quiet)


def _run(run: Run, algos: tuple[str, ...], until: str, redo: str, quiet: bool) -> Path:
    cfg = run.cfg
    if redo:
        run.redo(redo)
    if run.refresh_eval():
        print(f"== eval: redone, to compare {', '.join(run.algos)}")
    for stage in STAGES:  # refuse a changed or broken run before any work is done
        run.check(stage)
        missing = [s for s in requires(cfg, stage, run.algos) if run.done(s) is None]
        if run.done(stage) is not None and missing:
            raise ValueError(
                f"{run.dir(stage)} is finished but the stage it needs, {missing[0]}, is missing or "
                f"unfinished in {run.out}; rerun with --redo {missing[0]}"
            )
    write_json(run.out / "config.json", config_data(cfg, run.algos))
    todo = [s for s in run_stages(cfg, algos) if STAGES.index(s) <= STAGES.index(until)]
    for i, stage in enumerate(todo, start=1):
        done = run.done(stage)
        if done is not None:
            print(f"== {i}/{len(todo)} {stage}: done ({done['seconds']:.0f} s), skipped")
            continue
        print(f"== {i}/{len(todo)} {stage}")
        run.start(stage)
        t0 = time.perf_counter()
        summary = STAGE_FUNCTIONS[stage](run, quiet)
        run.finish(stage, time.perf_counter() - t0, summary)
        print(
            f"== {stage} finished in {time.perf_counter() - t0:.0f} s: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    return write_report(run)
