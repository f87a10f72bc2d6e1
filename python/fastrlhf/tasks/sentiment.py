"""The sentiment task: continue the opening of a Shakespeare line positively.

Prompts are the first few words of corpus lines; SFT demonstrations are the corpus's own continuations
of train prompts that VADER (Hutto & Gilbert, ICWSM 2014) scores positive; the scripted labeler ranks
sampled continuations by the same score, which is also the task's true score.
A prompt is held out when the CRC-32 of its text is divisible by HELDOUT_EVERY, so the split depends on
the text alone (not on corpus order or a seed), and every line sharing an opening lands on the same side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastrlhf.data import corpus as corpora
from fastrlhf.data.formats import SFTExample
from fastrlhf.tasks.base import Goal, held_out_by_text

__all__ = ["HELDOUT_EVERY", "SentimentTask", "make_sentiment_task", "split_line"]

HELDOUT_EVERY = 10


def split_line(line: str, prompt_words: int, min_response_words: int = 1) -> tuple[str, str] | None:
    """(first prompt_words words, the rest with its leading space), whitespace collapsed, or None when
    the line has fewer than prompt_words + min_response_words words."""
    words = line.split()
    if len(words) < prompt_words + min_response_words:
        return None
    # the response starts with the space, so prompt + response is the line and generation continues it
    return " ".join(words[:prompt_words]), " " + " ".join(words[prompt_words:])


def _held_out(prompt: str) -> bool:
    return held_out_by_text(prompt, HELDOUT_EVERY)


@dataclass(frozen=True)
class SentimentTask:
    """Train/held-out prompts and positive demonstrations; ranked by the `sentiment` labeler."""

    train_prompts: tuple[str, ...]
    heldout_prompts: tuple[str, ...]
    demos: tuple[SFTExample, ...]

    name = "sentiment"

    def prompts(self, split: str) -> list[str]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}")
        return list(self.train_prompts if split == "train" else self.heldout_prompts)

    def demonstrations(self) -> list[SFTExample]:
        return list(self.demos)

    def pretrain_documents(self) -> list[str]:
        """Shakespeare's works (the corpus the prompts come from when no other is given)."""
        return corpora.read_texts(corpora.fetch_shakespeare())


def make_sentiment_task(
    lines: Iterable[str],
    *,
    prompt_words: int = 4,
    min_response_words: int = 2,
    threshold: float = 0.05,
    score: Callable[[str], float] | None = None,
) -> SentimentTask:
    """Build the task from corpus lines. Prompts are distinct openings (first appearance order) of lines
    with at least prompt_words + min_response_words words; a continuation is a demonstration when its
    score (default: VADER compound) is >= threshold (0.05 is VADER's own positive cut-off)."""
    if isinstance(lines, str):
        raise TypeError("lines must be an iterable of corpus lines, not one string (use text.splitlines())")
    if prompt_words < 1 or min_response_words < 1:
        raise ValueError(
            f"prompt_words and min_response_words must be >= 1; got {prompt_words}, {min_response_words}"
        )
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1] (VADER compound scale); got {threshold}")
    if score is None:
        score = vader_compound
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    demos = []
    n_lines = 0
    for line in lines:
        n_lines += 1
        parts = split_line(line, prompt_words, min_response_words)
        if parts is None:
            continue
        prompt, response = parts
        heldout = _held_out(prompt)
        if prompt not in seen:
            seen.add(prompt)
            splits["heldout" if heldout else "train"].append(prompt)
        if not heldout and score(response) >= threshold:
            demos.append(SFTExample(prompt, response))
    if not splits["train"] or not splits["heldout"]:
        raise ValueError(
            f"the corpus gives {len(splits['train'])} train and {len(splits['heldout'])} held-out prompts from "
            f"{n_lines} lines (a line needs >= {prompt_words + min_response_words} words); both must be non-empty"
        )
    return SentimentTask(tuple(splits["train"]), tuple(splits["heldout"]), tuple(demos))


# ---- what the pipeline and the labelers read (tasks/registry.py) --------------------------------------
NAME = "sentiment"
GOAL = Goal(metric="mean VADER compound", min_gain=0.3, rm_accuracy=0.75)
_VADER = []  # the analyzer, built on first use (loading its lexicon takes ~50 ms)


@dataclass
class Options:
    """The pipeline's [sentiment] table: none yet (the corpus is [data] corpus)."""

    LABEL_FIELDS = ()


def vader_compound(text: str) -> float:
    """VADER's compound score of text in [-1, 1]; >= 0.05 is VADER's own threshold for positive."""
    if not _VADER:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER.append(SentimentIntensityAnalyzer())
    return _VADER[0].polarity_scores(text)["compound"]


def score(prompt: str, response: str) -> float:
    """The true score: the response's VADER compound."""
    return vader_compound(response)


preference = score  # the scripted labeler ranks by the true score itself


def build(options: Options, corpus: str = "") -> SentimentTask:
    """The task from the lines of `corpus` (a UTF-8 text file; default: Shakespeare, fetched once)."""
    paths = [corpus] if corpus else corpora.fetch_shakespeare()
    return make_sentiment_task(line for doc in corpora.read_texts(paths) for line in doc.splitlines())
