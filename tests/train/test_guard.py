"""Issue 22's guards in the shared loop (train/loop.py, train/guard.py) and the checkpoint writer: non-finite
steps skipped, counted and aborted on; non-finite weights never saved; a half-written log line, partial
checkpoint folders and a lost `latest` survived; Ctrl-C ends a run with a checkpoint."""

import errno
import math
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from fastrlhf.config import load_config
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.train.guard import NonFiniteError
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.loop import OfflineLoopConfig, offline_step, run_loop, run_outputs
from fastrlhf.train.optim import OptimConfig, make_adamw
from fastrlhf.train.pretrain import PretrainConfig, pretrain
from helpers.pretrain import TINY

SMALL = GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=16)


def cfg(data_dir, out, *extra):
    return load_config(
        PretrainConfig,
        None,
        [*TINY, f"train.data_dir={data_dir}", f"train.out_dir={out}", "train.max_steps=4", *extra],
    )


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_non_finite_steps_are_skipped_counted_and_abort_naming_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(SMALL)
    optim = OptimConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0)
    optimizer = make_adamw(model, optim)
    t = OfflineLoopConfig(max_steps=20, ckpt_interval=2, log_interval=4)
    bad, seen = {2, 5, 6, 7}, {}  # 0-based optimizer steps whose loss is NaN
    x = torch.randint(0, SMALL.vocab_size, (2, 16))

    def micro_loss(step, _i):
        seen[step] = weights(model)
        loss = model(x, x)[1]
        return loss * math.nan if step in bad else loss

    def save(at):
        ckpt.save_checkpoint(tmp_path, at, models={"model": model}, optimizers={"optim": optimizer}, keep=2)

    step = offline_step(
        model=model, optimizer=optimizer, optim=optim, t=t, micro_loss=micro_loss, tokens_per_step=1
    )
    with pytest.raises(NonFiniteError) as err:
        run_loop(
            t=t,
            step=0,
            train_step=step,
            save=save,
            outputs=run_outputs(tmp_path, t, 0, "t", True),
            model=model,
        )
    message = str(err.value)
    assert "3 non-finite training steps in a row (last, step 8: non-finite loss" in message
    assert "no update was applied" in message and "optim.lr too high" in message
    # the checkpoint due at step 6 was put off: step 6 was skipped, and so were the two after it
    assert f"the last good checkpoint is {tmp_path / 'step_0000004'}" in message
    # the skipped step 2 applied nothing: step 3 starts from step 2's weights; step 1 did change them
    assert all(torch.equal(seen[2][k], v) for k, v in seen[3].items())
    assert not all(torch.equal(seen[1][k], v) for k, v in seen[2].items())
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "log.jsonl")}
    assert rows[3]["loss"] is None and rows[3]["nonfinite_steps"] == 1  # skipped steps are always logged
    assert rows[4]["nonfinite_steps"] == 1 and rows[7]["nonfinite_steps"] == 3 and 5 not in rows
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000004"


def test_non_finite_weights_abort_at_once_and_are_never_saved(tmp_path):
    model = GPT(SMALL)
    optim = OptimConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0)
    optimizer = make_adamw(model, optim)
    t = OfflineLoopConfig(max_steps=20, ckpt_interval=2, log_interval=1)
    x = torch.randint(0, SMALL.vocab_size, (2, 16))

    def micro_loss(step, _i):
        if step == 2:  # what an update with an infinite learning rate or a NaN weight decay leaves
            with torch.no_grad():
                model.transformer.wte.weight[3, 3] = math.inf
        return model(x, x)[1]

    def save(at):
        ckpt.save_checkpoint(tmp_path, at, models={"model": model}, keep=1)

    step = offline_step(
        model=model, optimizer=optimizer, optim=optim, t=t, micro_loss=micro_loss, tokens_per_step=1
    )
    with pytest.raises(
        NonFiniteError, match=rf"weights are non-finite at step 3 .*{tmp_path / 'step_0000002'}"
    ):
        run_loop(
            t=t,
            step=0,
            train_step=step,
            save=save,
            outputs=run_outputs(tmp_path, t, 0, "t", True),
            model=model,
        )
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000002"]


def test_weights_that_went_non_finite_abort_and_are_never_checkpointed(data_dir, tmp_path):
    pretrain(cfg(data_dir, tmp_path, "train.ckpt_interval=2", "train.keep_checkpoints=1"), quiet=True)
    good = ckpt.latest_checkpoint(tmp_path)
    blow_up = ("optim.lr=1e30", "optim.min_lr=1e30", "train.ckpt_interval=2", "train.keep_checkpoints=1")
    # weights of 1e30 stay finite, but the loss does not: the streak aborts; no checkpoint since step 4
    with pytest.raises(NonFiniteError, match=rf"3 non-finite training steps in a row.*{good}"):
        pretrain(cfg(data_dir, tmp_path, *blow_up, "train.max_steps=40"), quiet=True)
    assert ckpt.latest_checkpoint(tmp_path) == good and sorted(p.name for p in tmp_path.glob("step_*")) == [
        good.name
    ]
    model = GPT(load_config(PretrainConfig, None, TINY).model)
    ckpt.load_checkpoint(good, models={"model": model}, restore_rng=False)
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_the_checkpoint_writer_refuses_nan_cleans_a_full_disk_and_keeps_what_it_wrote(tmp_path, monkeypatch):
    model = GPT(SMALL)
    ckpt.save_checkpoint(tmp_path, 8, models={"model": model}, keep=1)
    # a run restarted in this folder writes step 2: rotation keeps it (the newest write), not step 8
    ckpt.save_checkpoint(tmp_path, 2, models={"model": model}, keep=1)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000002"]
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.inf
    with pytest.raises(
        ValueError, match=r"model tensor '.*' is not finite: refusing to write .*step_0000004"
    ):
        ckpt.save_checkpoint(tmp_path, 4, models={"model": model}, keep=1)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 0.0
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, 6, models={"model": model}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002"]


def test_a_half_written_log_line_partial_folders_and_a_lost_latest_are_survived(data_dir, tmp_path, capsys):
    pretrain(cfg(data_dir, tmp_path, "train.ckpt_interval=2", "train.eval_interval=2"), quiet=True)
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 2.1, "l')  # a kill mid-write
    (tmp_path / ".step_0000006.x1y2").mkdir()  # a kill mid-checkpoint
    (tmp_path / ".step_0000006.x1y2" / "model.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "latest").unlink()  # lost: the newest complete step folder is used
    pretrain(
        cfg(data_dir, tmp_path, "train.ckpt_interval=2", "train.eval_interval=2", "train.max_steps=6"),
        quiet=True,
    )
    assert f"warning: {log}: dropped a half-written last line" in capsys.readouterr().err
    steps = [r["step"] for r in read_jsonl(log) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4 (not restarted at 0), nothing twice
    assert not list(tmp_path.glob(".step_*")) and ckpt.latest_checkpoint(tmp_path).name == "step_0000006"
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{log} line 2 is not JSON"):
        read_jsonl(log)


def test_ctrl_c_writes_a_checkpoint_at_the_current_step_and_exits_with_one_line(data_dir, tmp_path):
    args = [*TINY, f"train.data_dir={data_dir}", f"train.out_dir={tmp_path}", "train.max_steps=100000"]
    args += ["train.ckpt_interval=0", "train.eval_interval=100000", "train.threads=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrlhf", "pretrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        while "step      3" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step ") and "Traceback" not in err
    step = int(lines[0].split()[3])
    assert step >= 3 and ckpt.latest_checkpoint(tmp_path).name == f"step_{step:07d}"
    assert lines[0].endswith(f"the same command resumes from {tmp_path / f'step_{step:07d}'}")
    assert read_jsonl(tmp_path / "log.jsonl")[-1]["step"] == step


def test_sft_from_a_checkpoint_follows_train_seed_applies_dropout_and_refuses_shape_fields(
    data_dir, tmp_path
):
    from fastrlhf.train.sft import sft
    from helpers.sft import sft_config, write_demos

    pretrain(cfg(data_dir, tmp_path / "pre", "train.max_steps=2"), quiet=True)
    demos = write_demos(tmp_path / "demos.jsonl", n=60)

    def run(name, *extra, rng=0):
        torch.manual_seed(rng)  # what ran before in the process must not matter
        args = [
            f"data.source={demos}",
            f"train.init_from={tmp_path / 'pre'}",
            f"train.out_dir={tmp_path / name}",
        ]
        sft(sft_config(*args, "train.max_steps=3", "train.eval_interval=3", *extra), quiet=True)
        return _load(tmp_path / name)

    a = run("a", "model.dropout=0.3", "train.seed=1", rng=123)
    b = run("b", "model.dropout=0.3", "train.seed=1", rng=456)
    c = run("c", "model.dropout=0.3", "train.seed=2", rng=123)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(
        ValueError, match=r"model.n_layer = 3 cannot apply to train.init_from .*has n_layer = 2"
    ):
        run("d", "model.n_layer=3")


def _load(run):
    from fastrlhf.models.load import load_model

    model, _ = load_model(run)
    assert model.config.dropout == 0.3  # recorded with the run
    return weights(model)


def test_a_run_killed_before_its_first_checkpoint_leaves_no_rows_behind(data_dir, tmp_path):
    (tmp_path / "log.jsonl").write_text(
        '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n'
    )  # the dead run's
    pretrain(cfg(data_dir, tmp_path), quiet=True)
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl") if "loss" in r] == [1, 2, 3, 4]
