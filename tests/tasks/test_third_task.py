"""A third task is one module plus one TOML: a toy task written to a temporary folder, registered, runs
the pipeline's first stages with its own defaults, scorer and goal; no other file had to name it."""

import importlib.util
import json
import types

import pytest
from fastrlhf.pipeline.config import load_pipeline_config
from fastrlhf.pipeline.run import run_pipeline
from fastrlhf.tasks import registry

MODULE = """
from dataclasses import dataclass
from fastrlhf.data.formats import SFTExample
from fastrlhf.tasks.base import Goal

NAME = "echo"
GOAL = Goal(metric="exact echo", min_gain=0.1, rm_accuracy=0.8)


@dataclass
class Options:
    words: int = 30
    LABEL_FIELDS = ()


@dataclass
class EchoTask:
    words: int
    name = NAME

    def prompts(self, split):
        start = 0 if split == "train" else self.words
        return [f"say w{i}" for i in range(start, start + self.words)]

    def demonstrations(self):
        return [SFTExample(p, " " + p.split()[1]) for p in self.prompts("train")]

    def pretrain_documents(self):
        return [f"say w{i} w{i}" for i in range(2 * self.words)] * 4


def build(options, corpus=""):
    return EchoTask(options.words)


def score(prompt, response):
    return float(response.strip() == prompt.split()[1])


preference = score
"""
TOML = "[data]\nvocab_size = 300  # the echo task has a tiny vocabulary\n"
TINY = [
    "pretrain.model.vocab_size=300",
    "pretrain.model.n_layer=1",
    "pretrain.model.n_head=2",
    "pretrain.model.n_embd=32",
    "pretrain.model.block_size=64",
    "pretrain.train.max_steps=2",
    "pretrain.train.batch_size=4",
    "pretrain.train.eval_interval=2",
    "pretrain.train.eval_batches=1",
    "sft.train.max_steps=2",
    "sft.train.batch_size=4",
    "run.threads=1",
    "run.device=cpu",
    "echo.words=40",
]


@pytest.fixture
def echo(tmp_path):
    (tmp_path / "echo.py").write_text(MODULE)
    (tmp_path / "echo.toml").write_text(TOML)
    spec = importlib.util.spec_from_file_location("echo_task", tmp_path / "echo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry.register_task(module)
    yield module
    registry._modules().pop("echo")


def test_a_registered_module_and_toml_run_the_first_stages(echo, tmp_path):
    cfg = load_pipeline_config("echo", None, TINY)
    assert cfg.data.vocab_size == 300 and cfg.options.words == 40  # its TOML and its [echo] table
    run_pipeline(tmp_path / "run", cfg, until="sft", quiet=True)
    done = json.loads((tmp_path / "run" / "sft" / "DONE.json").read_text())
    assert done["summary"] and (tmp_path / "run" / "data" / "sft.jsonl").read_text().count("\n") == 40
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['echo.sentences'\]"):
        load_pipeline_config("echo", None, ["echo.sentences=3"])


def test_a_module_without_the_interface_is_refused():
    half = types.ModuleType("half")
    half.NAME = "half"
    with pytest.raises(ValueError, match=r"lacks \['GOAL', 'Options', 'build', 'score', 'preference'\]"):
        registry.register_task(half)
