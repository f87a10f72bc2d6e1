"""The whole recipe in one call (InstructGPT, arXiv 2203.02155, figure 2), on one machine: stages data
(corpus -> byte-level BPE -> token files), pretrain, sft, label (K sampled answers per prompt, ranked by the
task's scripted labeler), rm, ppo, eval (SFT vs PPO on the same held-out prompts), then report.md with
tables, samples and plots. A stage records a fingerprint of its settings when it starts and DONE.json when
it ends: a rerun skips finished stages and resumes an interrupted one from its last checkpoint (the
trainers resume on their own); a stage whose settings changed is refused (--redo STAGE redoes it and every
later stage). The stages wire the paths between them; every other field comes from the config."""

from __future__ import annotations

import time
from pathlib import Path

from fastrlhf.io.lock import RunLock
from fastrlhf.pipeline.config import STAGES, PipelineConfig, config_data
from fastrlhf.pipeline.folder import Run, write_json
from fastrlhf.pipeline.report import write_report
from fastrlhf.pipeline.stages import STAGE_FUNCTIONS
from fastrlhf.train import dist


def run_pipeline(
    out: str | Path, cfg: PipelineConfig, *, until: str = "eval", redo: str = "", quiet: bool = False
) -> Path:
    """Run (or resume) every stage up to `until`, then write the report; returns runs/NAME/report.md."""
    if dist.launched():
        raise ValueError(
            "the pipeline runs in one process (its data and labeling stages are not distributed); "
            "launch the trainers themselves under torchrun instead (docs/distributed.md)"
        )
    run = Run(out, cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    with RunLock(run.out, "pipeline"):  # a second pipeline on this folder stops here, naming this one
        return _run(run, until, redo, quiet)


def _run(run: Run, until: str, redo: str, quiet: bool) -> Path:
    if redo:
        run.redo(redo)
    for i, stage in enumerate(STAGES):  # refuse a changed or broken run before any work is done
        run.check(stage)
        missing = [s for s in STAGES[:i] if run.done(s) is None]
        if run.done(stage) is not None and missing:
            raise ValueError(
                f"{run.dir(stage)} is finished but the stage it needs, {missing[0]}, is missing or "
                f"unfinished in {run.out}; rerun with --redo {missing[0]}"
            )
    write_json(run.out / "config.json", config_data(run.cfg))
    for i, stage in enumerate(STAGES[: STAGES.index(until) + 1], start=1):
        done = run.done(stage)
        if done is not None:
            print(f"== {i}/{len(STAGES)} {stage}: done ({done['seconds']:.0f} s), skipped")
            continue
        print(f"== {i}/{len(STAGES)} {stage}")
        run.start(stage)
        t0 = time.perf_counter()
        summary = STAGE_FUNCTIONS[stage](run, quiet)
        run.finish(stage, time.perf_counter() - t0, summary)
        print(
            f"== {stage} finished in {time.perf_counter() - t0:.0f} s: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    return write_report(run)
