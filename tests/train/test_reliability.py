"""Issue 22's trainer-level guards, through the shared loop: one writer per run folder (a second process
is refused with the holder's pid), a resume that cuts log rows past its checkpoint, loop fields range-
checked, and a model too big for the machine refused before anything is allocated."""

import json
import subprocess
import sys

import pytest
from fastrlhf.config import load_config
from fastrlhf.io.lock import RunLockedError
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.pretrain import PretrainConfig, pretrain
from helpers.pretrain import TINY

HOLD = (
    "import sys, time; from fastrlhf.io.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(60)"
)


def cfg(data_dir, out, *extra):
    return load_config(
        PretrainConfig,
        None,
        [
            *TINY,
            f"train.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.max_steps=4",
            "train.eval_interval=2",
            *extra,
        ],
    )


def test_a_second_writer_of_a_run_folder_is_refused(data_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"being written by another process \(pid {holder.pid}"):
            pretrain(cfg(data_dir, tmp_path), quiet=True)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    pretrain(cfg(data_dir, tmp_path), quiet=True)  # the holder is gone: the folder is free


def test_a_resume_cuts_log_rows_written_after_its_checkpoint(data_dir, tmp_path):
    pretrain(cfg(data_dir, tmp_path, "train.ckpt_interval=2"), quiet=True)
    log = tmp_path / "log.jsonl"
    rows = read_jsonl(log)
    # what a run killed after its step-4 checkpoint but before step 6's would leave: rows past the checkpoint
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"step": 5, "loss": 1.0}) + "\n")
    pretrain(cfg(data_dir, tmp_path, "train.ckpt_interval=2", "train.max_steps=6"), quiet=True)
    steps = [r["step"] for r in read_jsonl(log) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_loop_fields_and_impossible_models_are_named(data_dir, tmp_path):
    for bad, message in [
        ("train.keep_checkpoints=-1", r"train.keep_checkpoints must be in \[0, inf\]; got -1"),
        ("train.ckpt_interval=-5", r"train.ckpt_interval must be in \[0, inf\]; got -5"),
        ("train.max_minutes=-1", r"train.max_minutes must be in \[0.0, inf\); got -1.0"),
        ("train.threads=-3", r"train.threads must be in \[0, inf\]; got -3"),
        ("train.device=tpu", r"train.device must be one of \['auto', 'cpu', 'cuda'\]; got 'tpu'"),
    ]:
        with pytest.raises(ValueError, match=message):
            cfg(data_dir, tmp_path, bad)
    # 3.2e9 parameters (a 100M-row position table): 12 GiB of weights, 48 GiB to train; refused before allocating
    with pytest.raises(ValueError, match=r"needs \d+\.\d GiB to train.* block_size=100000000"):
        pretrain(cfg(data_dir, tmp_path, "model.block_size=100000000", "train.block_size=32"), quiet=True)
