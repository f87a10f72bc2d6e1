"""The answers file the web labeler serves: one JSON object per line, a prompt and its K sampled answers.

    {"id": "p-3f2a9c01d4e7", "prompt": "What is 37+45?", "responses": ["82", "81", "eighty", "92"]}

`id` is optional when reading (it defaults to prompt_id(prompt), a hash of the prompt text, so it is stable
across runs and machines); ids must be unique. Sampling and labeling may happen on different machines:
`label --labeler web` writes this file, `label-server --answers FILE` serves one written earlier.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fastrlhf.data.formats import FormatError, PathLike, ranking_problem

__all__ = ["AnswerItem", "prompt_id", "read_answers", "sample_answers_file", "write_answers"]


def prompt_id(prompt: str) -> str:
    """A short stable id of a prompt text: the same prompt gets the same id on every run."""
    return "p-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class AnswerItem:
    id: str
    prompt: str
    responses: tuple[str, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "responses": list(self.responses)}


def read_answers(path: PathLike) -> list[AnswerItem]:
    """The items of an answers file, checked line by line (errors name file:line)."""
    items: list[AnswerItem] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(path, lineno, f"malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise FormatError(path, lineno, "expected an object with a string field 'prompt'")
        responses = obj.get("responses")
        if not isinstance(responses, list):
            raise FormatError(path, lineno, "expected a list field 'responses' (the K answers)")
        problem = ranking_problem(responses, range(len(responses)))
        if problem:
            raise FormatError(path, lineno, problem)
        pid = obj.get("id", prompt_id(obj["prompt"]))
        if not isinstance(pid, str) or not pid.strip() or len(pid) > 100:
            raise FormatError(
                path, lineno, f"'id' must be a non-empty string of <= 100 characters; got {pid!r}"
            )
        if pid in seen:
            raise FormatError(path, lineno, f"id {pid!r} repeats line {seen[pid]} (same prompt twice?)")
        seen[pid] = lineno
        items.append(AnswerItem(pid, obj["prompt"], tuple(responses)))
    return items


def write_answers(path: PathLike, items: list[AnswerItem]) -> None:
    """Write the whole file atomically (a temporary file, then a rename)."""
    from fastrlhf.io.files import atomic_write_text

    text = "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n" for it in items)
    atomic_write_text(Path(path), text)


def sample_answers_file(
    model,
    tok,
    prompts: list[str],
    path: PathLike,
    *,
    k: int,
    batch_prompts: int,
    max_new_tokens: int,
    seed: int,
    progress: bool = False,
    **sampling,
) -> tuple[list[AnswerItem], int]:
    """Sample k answers for each prompt not yet in the answers file `path` and rewrite it with them added
    (a rerun resumes: prompts already there are not sampled again). Returns the items of `prompts`, in
    their order, and how many prompts were left out because an answer stayed empty."""
    import torch
    from tqdm import tqdm

    from fastrlhf.labeling.answers import sample_answers

    have = {it.prompt: it for it in read_answers(path)} if Path(path).is_file() else {}
    todo = [p for p in prompts if p not in have]
    gen = torch.Generator().manual_seed(seed)
    empty = 0
    for i in tqdm(range(0, len(todo), batch_prompts), desc="sample", unit="batch", disable=not progress):
        chunk = todo[i : i + batch_prompts]
        for prompt, answers in zip(
            chunk, sample_answers(model, tok, chunk, k, max_new_tokens, generator=gen, **sampling)
        ):
            if answers is None:
                empty += 1
            else:
                have[prompt] = AnswerItem(prompt_id(prompt), prompt, tuple(answers))
        write_answers(path, list(have.values()))  # after every batch: an interrupt keeps what was sampled
    return [have[p] for p in prompts if p in have], empty
