"""The pipeline on a tiny synthetic corpus: every stage runs, a re-run skips them all, an unfinished
stage is resumed, changed settings are refused until --redo, and bad input names what is wrong."""

import json
import random
import runpy
import sys
from pathlib import Path

import pytest
from fastrlhf.cli import main
from fastrlhf.pipeline.config import STAGES, fingerprints, load_pipeline_config, run_stages
from fastrlhf.pipeline.run import run_pipeline

# few distinct words, half of them charged: the BPE makes them whole tokens, so that even a barely trained
# model's answers often hold one and the scripted labeler's VADER scores rarely all tie
WORDS = ["the", "king", "and", "queen", "of", "this", "land", "did", "walk", "to"]
MOODS = ["good", "sweet", "love", "happy", "noble", "bad", "hate", "sad", "foul", "death"]

TINY = [
    "data.vocab_size=300",
    "pretrain.model.vocab_size=300",
    "pretrain.model.n_layer=1",
    "pretrain.model.n_head=2",
    "pretrain.model.n_embd=32",
    "pretrain.model.block_size=64",
    "pretrain.train.max_steps=4",
    "pretrain.train.batch_size=4",
    "pretrain.train.eval_interval=2",
    "pretrain.train.eval_batches=2",
    "sft.train.max_steps=3",
    "sft.train.batch_size=4",
    "label.train_prompts=24",
    "label.heldout_prompts=8",
    "label.max_new_tokens=6",
    "rm.train.max_steps=3",
    "rm.train.batch_size=4",
    "ppo.ppo.rollout_batch=4",
    "ppo.ppo.minibatch=2",
    "ppo.ppo.max_new_tokens=6",
    "ppo.train.max_steps=2",
    "eval.prompts=6",
    "eval.samples=3",
    "run.threads=1",
    "run.device=cpu",
]
GOLD = Path(__file__).parents[2] / "scripts" / "ppo_gold_reward.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(5))
        + " "
        + " ".join(rng.choice(WORDS + MOODS) for _ in range(4))
        for _ in range(600)
    ]
    path = tmp_path_factory.mktemp("corpus") / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny(corpus, *extra):
    return load_pipeline_config("sentiment", None, [f"data.corpus={corpus}", *TINY, *extra])


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    report = run_pipeline(out, tiny(corpus), quiet=True)
    return out, report


def test_every_stage_runs_and_the_report_has_goals_tables_samples_and_plots(finished):
    out, report = finished
    for stage in ("data", "pretrain", "sft", "label", "rm", "ppo", "eval"):
        done = json.loads((out / stage / "DONE.json").read_text())
        assert done["seconds"] >= 0 and done["summary"]
    text = report.read_text()
    for heading in ("## Goals", "## Stages", "## Plots", "## Evaluation on held-out prompts", "## Samples"):
        assert heading in text
    assert "mean VADER compound beats SFT's by >= 0.3" in text and "pairwise accuracy >= 0.75" in text
    for name in ("losses", "rm_accuracy", "reward", "kl", "entropy", "true_score"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{name}.png" in text
    ppo_log = [json.loads(line) for line in (out / "ppo" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in ppo_log if "score_mean" in r]  # every step logs the rollouts' VADER mean too
    assert steps and all(-1.0 <= r["true_score"] <= 1.0 for r in steps) and "| true_score |" in text
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["sft"]["kl"] == pytest.approx(0.0, abs=1e-4) for r in rows)
    assert all(-1.0 <= r[w]["score"] <= 1.0 for r in rows for w in ("sft", "ppo"))


def test_gold_reward_script_trains_on_the_true_score_and_leaves_the_run_alone(
    finished, tmp_path, capsys, monkeypatch
):
    out, _ = finished
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(
        sys, "argv", [str(GOLD), str(out), "--out", str(tmp_path / "gold"), "ppo.train.max_steps=2"]
    )
    runpy.run_path(str(GOLD), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the SFT column is the eval stage's own: same prompts, same seeds
    assert result["sft"] == pytest.approx(
        json.loads((out / "eval" / "metrics.json").read_text())["sft_score"]
    )
    assert result["prompts"] == 6 and result["gain"] == pytest.approx(result["ppo_gold"] - result["sft"])
    steps = [json.loads(line) for line in (tmp_path / "gold" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "score_mean" in r]
    assert len(steps) == 2 and all(
        r["score_mean"] == pytest.approx(r["true_score"]) for r in steps
    )  # gold reward
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_gold_reward_script_names_a_folder_that_is_not_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(GOLD), str(tmp_path)])
    with pytest.raises(SystemExit, match="config.json not found"):
        runpy.run_path(str(GOLD), run_name="__main__")


def test_a_rerun_skips_every_finished_stage(finished, corpus, capsys):
    out, _ = finished
    stages = run_stages(tiny(corpus), ("ppo",))
    assert stages == ("data", "pretrain", "sft", "label", "rm", "ppo", "eval")
    before = {s: (out / s / "DONE.json").read_text() for s in stages}
    run_pipeline(out, tiny(corpus), quiet=True)
    printed = capsys.readouterr().out
    assert all(f" {s}: done" in printed for s in stages), printed
    assert {s: (out / s / "DONE.json").read_text() for s in stages} == before
    assert not any((out / s).exists() for s in STAGES if s not in stages)  # the critic-free ones


def test_an_unfinished_stage_resumes_from_its_checkpoint(finished, corpus, capsys):
    out, _ = finished
    log = (out / "ppo" / "log.jsonl").read_text()
    for stage in ("ppo", "eval"):  # as if killed during PPO after its last checkpoint
        (out / stage / "DONE.json").unlink()
    run_pipeline(out, tiny(corpus), quiet=True)
    printed = capsys.readouterr().out
    assert "rm: done" in printed and "== 6/7 ppo\n" in printed
    assert (out / "ppo" / "log.jsonl").read_text() == log  # at max_steps already: no step is repeated


def test_changed_settings_are_refused_until_redo(finished, corpus):
    out, _ = finished
    with pytest.raises(ValueError, match=r"rm was made with other settings .* --redo rm"):
        run_pipeline(out, tiny(corpus, "rm.train.margin=0.5"), quiet=True)
    # runtime-only fields never invalidate a stage
    assert fingerprints(tiny(corpus, "run.threads=2", "ppo.train.max_minutes=9")) == fingerprints(
        tiny(corpus)
    )


def test_redo_remakes_a_stage_and_every_later_one(finished, corpus, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    before = (out / "sft" / "DONE.json").read_text()
    run_pipeline(out, tiny(corpus, "eval.samples=2"), redo="eval", quiet=True)
    assert (out / "sft" / "DONE.json").read_text() == before
    assert json.loads((out / "eval" / "DONE.json").read_text())["summary"]["prompts"] == 6
    shutil.rmtree(out / "sft")
    with pytest.raises(ValueError, match=r"the stage it needs, sft, is missing or unfinished .* --redo sft"):
        run_pipeline(out, tiny(corpus, "eval.samples=2"), quiet=True)


def critic_free(*algos):
    """Tiny settings for the critic-free stages (2 prompts x 2 answers a step, 2 steps)."""
    return [
        f"{a}.{a}.{k}"
        for a in algos
        for k in ("prompts_per_step=2", "group_size=2", "minibatch=4", "max_new_tokens=6")
    ] + [f"{a}.train.max_steps=2" for a in algos]


def test_critic_free_stages_join_a_ppo_run_and_the_report_compares_them(finished, corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    algos = ("grpo", "rloo", "reinforce_pp")
    cfg = tiny(corpus, *critic_free(*algos), "grpo.train.reward=task + 0.5 * rm")
    before = {s: (out / s / "DONE.json").read_text() for s in ("sft", "rm", "ppo")}
    report = run_pipeline(out, cfg, algos=algos, quiet=True)
    printed = capsys.readouterr().out
    assert "== eval: redone, to compare ppo, grpo, rloo, reinforce_pp" in printed
    assert {s: (out / s / "DONE.json").read_text() for s in ("sft", "rm", "ppo")} == before  # reused
    for algo in algos:
        steps = [json.loads(x) for x in (out / algo / "log.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "reward_mean" in r]
        assert len(steps) == 2 and all(r["first_ratio_dev"] < 1e-3 for r in steps), algo
    summary = json.loads((out / "eval" / "DONE.json").read_text())["summary"]
    assert {f"{a}_score" for a in ("ppo", *algos)} <= set(summary)
    rows = [json.loads(x) for x in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["prompt", "sft", "ppo", *algos]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["grpo_gain"] == pytest.approx(metrics["grpo_score"] - metrics["sft_score"])
    text = report.read_text()
    assert text.startswith("# fastrlhf pipeline: sentiment (PPO, GRPO, RLOO, REINFORCE++)")
    for name in ("GRPO", "RLOO", "REINFORCE++"):
        assert (
            f"| {name} mean VADER compound beats SFT's" in text and f"## {name}, mean of the last 10" in text
        )
    assert "| prompt | SFT answer | score | PPO answer | score | GRPO answer |" in text
    run_pipeline(out, cfg, algos=algos, quiet=True)  # a rerun skips everything, eval included
    assert "eval: done" in capsys.readouterr().out


def test_a_critic_free_run_on_the_task_reward_skips_label_and_rm(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    report = run_pipeline(out, tiny(corpus, *critic_free("grpo")), algos=("grpo",), quiet=True)
    assert "== 4/5 grpo" in capsys.readouterr().out
    assert not (out / "label").exists() and not (out / "rm").exists() and not (out / "ppo").exists()
    config = json.loads((out / "config.json").read_text())
    assert "grpo" in config and "rloo" not in config
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert (
        "grpo_score" in metrics
        and "ppo_score" not in metrics
        and metrics["grpo_reward"] != metrics["grpo_reward"]
    )
    assert "# fastrlhf pipeline: sentiment (GRPO)" in report.read_text()
    with pytest.raises(ValueError, match=r"--algo must be one or more of .*'dpo'\].*got \['a2c'\]"):
        run_pipeline(out, tiny(corpus), algos=("a2c",), quiet=True)
    with pytest.raises(ValueError, match=r"\[grpo\] .*train.reward must be sources joined by ' \+ '"):
        tiny(corpus, "grpo.train.reward=2 * ")


def test_dpo_trains_on_the_label_stages_rankings_and_joins_the_report(finished, corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    before = {s: (out / s / "DONE.json").read_text() for s in ("sft", "label", "rm", "ppo")}
    dpo = [
        "dpo.train.max_steps=3",
        "dpo.train.batch_size=2",
        "dpo.train.eval_interval=3",
        "dpo.train.log_interval=1",
    ]
    report = run_pipeline(out, tiny(corpus, *dpo), algos=("dpo",), quiet=True)
    assert "== eval: redone, to compare ppo, dpo" in capsys.readouterr().out
    assert {s: (out / s / "DONE.json").read_text() for s in ("sft", "label", "rm", "ppo")} == before
    rows = [json.loads(x) for x in (out / "dpo" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and any("val_accuracy" in r for r in rows)
    assert json.loads((out / "dpo" / "DONE.json").read_text())["summary"]["steps"] == 3
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"ppo_score", "dpo_score", "dpo_gain"} <= set(metrics)
    assert "dpo" in json.loads((out / "config.json").read_text())
    assert report.read_text().startswith("# fastrlhf pipeline: sentiment (PPO, DPO)")


def test_a_pretrained_model_skips_pretraining_and_keeps_its_chat_template(corpus, tmp_path, capsys):
    """issue 20: --model (run.model) starts the recipe from a Hugging Face folder: the data stage tokenizes with
    the model's tokenizer, no pretrain stage, SFT fine-tunes the model (LoRA here), PPO (with its ptx mix in the
    model's ids) and GRPO follow, and the eval compares them, every prompt in the model's chat template."""
    pytest.importorskip("transformers")
    from fastrlhf.models.llama import LlamaForCausalLM
    from fastrlhf.models.load import load_model
    from helpers.hf_models import tiny_llama_folder

    hf = tiny_llama_folder(tmp_path / "hf", context=512)  # chat-formatted sentiment demos run long
    extra = [f"run.model={hf}", "sft.lora.r=4", "ppo.ppo.ptx_coef=0.5", *critic_free("grpo")]
    out = tmp_path / "run"
    report = run_pipeline(out, tiny(corpus, *extra), algos=("ppo", "grpo"), quiet=True)
    printed = capsys.readouterr().out
    assert "pretrain" not in printed and not (out / "pretrain").exists()
    assert "== 1/7 data" in printed and "== 2/7 sft" in printed and "== 7/7 eval" in printed
    meta = json.loads((out / "data" / "DONE.json").read_text())["summary"]
    model, tok = load_model(out / "sft")
    assert isinstance(model, LlamaForCausalLM) and meta["vocab_size"] == tok.vocab_size and tok.chat_template
    assert json.loads((out / "config.json").read_text())["run"]["model"] == str(hf)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"sft_score", "ppo_score", "grpo_score"} <= set(metrics)
    # the pretrained model answers too, and judges every model's answers (perplexity), as does distinct-2
    assert {"base_score", "ppo_over_base", "grpo_over_base_sem"} <= set(metrics)
    for who in ("base", "sft", "ppo", "grpo"):
        assert 1.0 < metrics[f"{who}_perplexity"] < float("inf") and 0 <= metrics[f"{who}_distinct2"] <= 1
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(r[who]["base_nll"] > 0 for r in rows for who in ("base", "sft", "ppo"))
    text = report.read_text()
    assert "# fastrlhf pipeline: sentiment (PPO, GRPO)" in text
    assert "PPO: the frozen base model's perplexity of its answers <= 1.5x SFT's" in text
    assert "GRPO: distinct-2 of its answers >= 0.8x SFT's" in text
    assert "| base model | " in text and "PPO against the pretrained model the run started from" in text


@pytest.mark.parametrize(
    "override, match",
    [
        ("label.k=1", r"label.k must be in \[2, 16\]; got 1"),
        ("eval.samples=999", r"eval.samples must be in \[0, 256\]; got 999"),
        ("ppo.ppo.clip_range=2", r"\[ppo\] ppo.clip_range must be in \(0.0, 1.0\); got 2.0"),
        ("sft.nope=1", r"\[sft\] unknown section\(s\) \['nope'\]"),
        ("run.model=/nowhere/model", r"run.model '/nowhere/model' is neither a Hugging Face model folder"),
        ("data.vocab_size=abc", r"\[data\] vocab_size must be int; got 'abc'"),
    ],
)
def test_bad_settings_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        load_pipeline_config("sentiment", None, [override])


def test_the_command_line_names_an_unknown_task(tmp_path, capsys):
    assert main(["pipeline", "--task", "poetry", "--out", str(tmp_path / "x")]) == 2
    assert (
        "--task must be one of ['arithmetic', 'sentiment', 'tone']; got 'poetry'" in capsys.readouterr().err
    )


def test_the_shipped_gpu_config_loads():
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / "pipeline_gpu.toml"
    cfg = load_pipeline_config("sentiment", str(path))
    assert cfg.run.device == "cuda" and cfg.pretrain.model.n_embd == 512 and cfg.ppo.ppo.rollout_batch == 128


@pytest.mark.parametrize(
    "override, match",
    [
        ("arithmetic.ops=+/", r"arithmetic.ops must be distinct operators from '\+-\*'; got '\+/'"),
        ("arithmetic.ops=++", r"arithmetic.ops must be distinct operators"),
        ("arithmetic.max_digits=7", r"arithmetic.max_digits must be in \[1, 6\]; got 7"),
        ("arithmetic.max_digits=1", r"arithmetic.train_problems must be in \[1, 90\]; got 9000"),
    ],
)
def test_bad_arithmetic_settings_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        load_pipeline_config("arithmetic", None, [override])


def test_arithmetic_data_stage_uses_the_chosen_problems_and_one_token_per_digit(tmp_path):
    from fastrlhf.data import load_tokenizer
    from fastrlhf.data.formats import read_sft
    from fastrlhf.tasks.arithmetic import parse_problem

    cfg = load_pipeline_config(
        "arithmetic",
        None,
        ["arithmetic.ops=+-", "arithmetic.train_problems=50", "arithmetic.pretrain_problems=300", *TINY[:2]],
    )
    run_pipeline(tmp_path / "run", cfg, until="data", quiet=True)
    demos = read_sft(tmp_path / "run" / "data" / "sft.jsonl")
    assert len(demos) == 50
    for d in demos:
        p = parse_problem(d.prompt)
        assert p.op in "+-" and d.response == p.answer
    tok = load_tokenizer(tmp_path / "run" / "data" / "tokenizer")
    pieces = [tok.decode([i]) for i in tok.encode("What is 37+45? 82")]
    assert all(not (len(p.strip()) > 1 and any(c.isdigit() for c in p)) for p in pieces), pieces
    # the problem space is part of the data stage's settings: changing it redoes everything
    other = load_pipeline_config(
        "arithmetic",
        None,
        ["arithmetic.ops=+", "arithmetic.train_problems=50", "arithmetic.pretrain_problems=300", *TINY[:2]],
    )
    assert fingerprints(cfg)["data"] != fingerprints(other)["data"]
