"""`python -m fastrlhf label`: sample K answers per prompt from an SFT model and rank them.

    python -m fastrlhf label --sft runs/sft --prompts arithmetic --k 4 --labeler arithmetic --out rankings.jsonl

Prompts are a built-in task's (--split train|heldout) or a file: one prompt per line, or JSONL objects
with a "prompt" field. Answers come from batched KV-cache generation (ops.sample); every ranking is
appended to --out the moment it is made (train.labelers.label_prompts), and a rerun resumes: prompts
already in --out are neither sampled nor shown again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from fastrlhf.data import Tokenizer, decode_response, encode_prompt
from fastrlhf.labeling.labelers import LabelStats
from fastrlhf.models import GPT, generate


def read_prompts(source: str, split: str, corpus: str = "") -> tuple[list[str], str | None]:
    """(prompts, the task's labeler name or None) of a task name or a prompts file."""
    from fastrlhf.tasks.registry import TASKS

    if source in TASKS:
        from fastrlhf.train.sft import load_task

        task = load_task(source, corpus)
        return task.prompts(split), task.labeler
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {source!r} is neither a task ({', '.join(TASKS)}) nor a file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string field 'prompt'")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return list(dict.fromkeys(prompts)), None  # each prompt once, in file order


def sample_answers(
    model: GPT,
    tok: Tokenizer,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    *,
    retries: int = 3,
    generator: torch.Generator | None = None,
    **sampling,
) -> list[list[str] | None]:
    """K decoded answers per prompt from one batched generate call (B = len(prompts) * K); empty answers
    are resampled up to `retries` times, and a prompt that still has one gets None (rankings need text)."""
    ids = [encode_prompt(tok, p) for p in prompts]
    room = model.config.block_size - max(map(len, ids))
    if room < 1:
        raise ValueError(f"a prompt fills the whole context ({model.config.block_size} tokens); shorten it")
    answers: list[list[str]] = [[""] * k for _ in prompts]
    todo = [(i, j) for i in range(len(prompts)) for j in range(k)]
    for _ in range(1 + retries):
        if not todo:
            break
        g = generate(
            model,
            [ids[i] for i, _ in todo],
            min(max_new_tokens, room),
            eos_token_id=tok.eot_id,
            generator=generator,
            **sampling,
        )
        for (i, j), row, mask in zip(todo, g.responses.tolist(), g.response_mask.tolist()):
            answers[i][j] = decode_response(tok, [t for t, m in zip(row, mask) if m])
        todo = [(i, j) for i, j in todo if not answers[i][j].strip()]
    return [None if any(not a.strip() for a in row) else row for row in answers]


def label_to_file(
    model: GPT,
    tok: Tokenizer,
    prompts: list[str],
    labeler,
    out: str | Path,
    *,
    k: int,
    batch_prompts: int,
    max_new_tokens: int,
    seed: int,
    progress: bool = False,
    desc: str = "label",
    **sampling,
) -> tuple[LabelStats, int]:
    """Sample k answers per prompt not yet in `out`, rank them and append each ranking to `out` at once
    (a progress bar over prompts when `progress`). Returns the labeling stats and how many prompts were
    skipped because an answer stayed empty."""
    from tqdm import tqdm

    from fastrlhf.data.formats import read_rankings
    from fastrlhf.labeling.labelers import label_prompts

    done = {r.prompt for r in read_rankings(out)} if Path(out).is_file() else set()
    todo = [p for p in prompts if p not in done]
    gen = torch.Generator().manual_seed(seed)
    no_answer = [0]

    bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress)

    def items() -> Iterator[tuple[str, list[str]]]:
        for i in range(0, len(todo), batch_prompts):
            chunk = todo[i : i + batch_prompts]
            bar.update(len(chunk))
            for prompt, answers in zip(
                chunk, sample_answers(model, tok, chunk, k, max_new_tokens, generator=gen, **sampling)
            ):
                if answers is None:
                    no_answer[0] += 1
                else:
                    yield prompt, answers

    stats = label_prompts(labeler, items(), out)
    bar.close()
    stats.skipped += len(prompts) - len(todo)
    return stats, no_answer[0]
