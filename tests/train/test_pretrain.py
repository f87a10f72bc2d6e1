import shutil

import pytest
import torch
from fastrlhf.config import load_config
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.io.safetensors import read_safetensors
from fastrlhf.models import GPT
from fastrlhf.models.load import load_model
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.pretrain import PretrainConfig, pretrain
from helpers.pretrain import TINY


def cfg(data_dir, out, *extra):
    return load_config(
        PretrainConfig, None, TINY + [f"train.data_dir={data_dir}", f"train.out_dir={out}", *extra]
    )


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """An uninterrupted 16-step run with checkpoints at 8 and 16 (and its initial weights)."""
    out = tmp_path_factory.mktemp("full")
    c = cfg(
        data_dir,
        out,
        "train.max_steps=16",
        "train.ckpt_interval=8",
        "train.eval_interval=8",
        "model.dropout=0.1",
    )
    torch.manual_seed(c.train.seed)
    init = GPT(c.model).weights()
    last = pretrain(c, quiet=True)
    return out, c, init, last


def test_loss_falls_and_every_parameter_changes(full_run):
    out, _, init, last = full_run
    log = read_jsonl(out / "log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    assert [r["step"] for r in log if "val_loss" in r] == [8, 16] and last["val_loss"] < losses[0]
    model, tok = load_model(out)
    assert tok is not None and tok.vocab_size == 300
    for name, w in model.weights().items():
        assert not torch.equal(w, init[name]), f"{name} did not change"


def test_resume_gives_identical_numbers(full_run, tmp_path):
    out, c, _, _ = full_run
    shutil.copytree(out / "step_0000008", tmp_path / "step_0000008")  # as if the run died after step 8
    (tmp_path / "latest").write_text("step_0000008\n")
    pretrain(
        cfg(
            c.train.data_dir,
            tmp_path,
            "train.max_steps=16",
            "train.ckpt_interval=8",
            "train.eval_interval=8",
            "model.dropout=0.1",
        ),
        quiet=True,
    )
    want = [r for r in read_jsonl(out / "log.jsonl") if r["step"] > 8]
    got = read_jsonl(tmp_path / "log.jsonl")
    key = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
    assert [key(r) for r in got] == [key(r) for r in want]
    a, b = load_model(out)[0].weights(), load_model(tmp_path)[0].weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_model_config_is_refused(full_run, tmp_path):
    out, c, _, _ = full_run
    shutil.copytree(out, tmp_path / "run")
    with pytest.raises(ValueError, match="was trained with model config"):
        pretrain(cfg(c.train.data_dir, tmp_path / "run", "train.max_steps=20", "model.n_layer=3"), quiet=True)


def test_damaged_checkpoints_give_clear_errors(full_run, tmp_path):
    out, _, _, _ = full_run
    shutil.copytree(out / "step_0000016", tmp_path / "c")
    model_file = tmp_path / "c" / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupted or truncated"):
        load_model(tmp_path / "c")
    model_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_model(tmp_path / "c")
    model_file.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_safetensors(model_file)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_model(tmp_path / "nothing")
    (tmp_path / "c" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json is corrupted"):
        load_model(tmp_path / "c")


def test_checkpoint_that_does_not_match_its_config(full_run, tmp_path):
    import json

    out, _, _, _ = full_run
    shutil.copytree(out / "step_0000016", tmp_path / "c")
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    state["model"]["config"]["n_embd"] = 64  # the model record the loader builds from
    (tmp_path / "c" / "state.json").write_text(json.dumps(state))
    with pytest.raises(
        ValueError,
        match=r"does not match the model config: wrong shapes: transformer.wte.weight: "
        r"expected \(300, 64\), got \(300, 32\)",
    ):
        load_model(tmp_path / "c")


def test_keeps_only_the_newest_checkpoints_and_writes_atomically(full_run):
    out, _, _, _ = full_run
    # .lock: the run-folder lock the writer held (io/lock.py; left in place, free once the writer exits)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "latest",
        "log.jsonl",
        "step_0000008",
        "step_0000016",
    ]
    assert ckpt.latest_checkpoint(out) == out / "step_0000016"


def test_bad_data_config(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.vocab_size \(200\) is smaller than the data's vocab \(300"):
        pretrain(cfg(data_dir, tmp_path, "model.vocab_size=200"), quiet=True)
    with pytest.raises(ValueError, match=r"train.block_size \(64\) must be <= model.block_size \(32\)"):
        pretrain(cfg(data_dir, tmp_path, "train.block_size=64"), quiet=True)
    with pytest.raises(FileNotFoundError, match="train.bin does not exist"):
        pretrain(cfg(tmp_path, tmp_path), quiet=True)


def test_time_budget_stops_early_with_a_checkpoint(data_dir, tmp_path):
    last = pretrain(cfg(data_dir, tmp_path, "train.max_steps=1000", "train.max_minutes=1e-6"), quiet=True)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_0000001"
    assert "val_loss" in last and read_jsonl(tmp_path / "log.jsonl")[0]["step"] == 1


@pytest.mark.gpu
def test_pretrain_on_gpu_with_bf16_autocast(data_dir, tmp_path):
    last = pretrain(
        cfg(data_dir, tmp_path, "train.max_steps=6", "train.device=cuda", "train.dtype=bf16"), quiet=True
    )
    assert torch.isfinite(torch.tensor([last["loss"], last["val_loss"]])).all()
    model, _ = load_model(tmp_path)
    assert next(model.parameters()).dtype == torch.float32
