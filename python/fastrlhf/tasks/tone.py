"""The tone task, for pretrained chat models: answer "Write a sentence about <topic>." warmly.

Prompts name everyday topics (tone_topics.txt, shipped). The SFT demonstrations (tone_demos.jsonl,
shipped; scripts/make_tone_demos.py made them) are SmolLM2-135M-Instruct's own one-sentence answers to
train prompts, kept for their form alone (one sentence, no preamble, no list) and never for their tone: SFT
teaches the short format, so the SFT model's tone is the base model's and any gain is the RL stage's.
The scripted labeler ranks answers by VADER's compound score (Hutto & Gilbert, ICWSM 2014), which is also
the true score, as in the sentiment task. A topic is held out when the CRC-32 of its text is divisible by
HELDOUT_EVERY, so the split depends on the text alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastrlhf.data import corpus as corpora
from fastrlhf.data.formats import SFTExample
from fastrlhf.tasks.base import Goal, held_out_by_text
from fastrlhf.tasks.sentiment import vader_compound

__all__ = ["HELDOUT_EVERY", "ToneTask", "prompt_for", "topics"]

HERE = Path(__file__).parent
HELDOUT_EVERY = 3
TEMPLATE = "Write a sentence about {}."


def topics() -> list[str]:
    """The shipped topics, in file order."""
    return [t.strip() for t in (HERE / "tone_topics.txt").read_text().splitlines() if t.strip()]


def prompt_for(topic: str) -> str:
    return TEMPLATE.format(topic)


def held_out(topic: str) -> bool:
    return held_out_by_text(topic, HELDOUT_EVERY)


@dataclass(frozen=True)
class ToneTask:
    name = "tone"

    def prompts(self, split: str) -> list[str]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}")
        return [prompt_for(t) for t in topics() if held_out(t) == (split == "heldout")]

    def demonstrations(self) -> list[SFTExample]:
        """The shipped one-sentence answers to train prompts (never a held-out topic)."""
        rows = [json.loads(line) for line in (HERE / "tone_demos.jsonl").read_text().splitlines() if line]
        return [SFTExample(prompt_for(r["topic"]), r["response"]) for r in rows if not held_out(r["topic"])]

    def pretrain_documents(self) -> list[str]:
        """Shakespeare's works (what a run without a pretrained model pretrains on; this task is meant for
        one, `--model`)."""
        return corpora.read_texts(corpora.fetch_shakespeare())


# ---- what the pipeline and the labelers read (tasks/registry.py) --------------------------------------
NAME = "tone"
# +0.3 over SFT: a third of VADER's distance between a neutral (0) and a glowing (~0.9) sentence, about
# three paired standard errors on the ~120 held-out topics; the RM goal is the sentiment task's
GOAL = Goal(metric="mean VADER compound", min_gain=0.3, rm_accuracy=0.75, max_minutes=30)


@dataclass
class Options:
    """The pipeline's [tone] table: none yet."""

    LABEL_FIELDS = ()


def score(prompt: str, response: str) -> float:
    """The true score: the response's VADER compound."""
    return vader_compound(response)


preference = score  # the scripted labeler ranks by the true score itself


def build(options: Options, corpus: str = "") -> ToneTask:
    return ToneTask()
