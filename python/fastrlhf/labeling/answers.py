"""`python -m fastrlhf label`: sample K answers per prompt from an SFT model and rank them.

    python -m fastrlhf label --sft runs/sft --prompts arithmetic --k 4 --labeler arithmetic --out rankings.jsonl

Prompts are a built-in task's (--split train|heldout) or a file: one prompt per line, or JSONL objects
with a "prompt" field. Answers come from batched KV-cache generation (ops.sample); every ranking is
appended to --out the moment it is made (train.labelers.label_prompts), and a rerun resumes: prompts
already in --out are neither sampled nor shown again."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from fastrlhf.data import Tokenizer, decode_response, encode_prompt
from fastrlhf.data.prompts import read_prompts
from fastrlhf.io.lock import RunLock
from fastrlhf.labeling.labelers import LabelStats
from fastrlhf.models import GPT, generate
from fastrlhf.tasks.registry import load_task, task_names


def task_or_file_prompts(source: str, split: str, corpus: str = "") -> tuple[list[str], str | None]:
    """(prompts, the task's name for its scripted labeler, or None) of a task name or a prompts file;
    each prompt once, in order."""
    if source in task_names():
        return load_task(source, corpus=corpus).prompts(split), source
    if not Path(source).is_file():
        raise FileNotFoundError(
            f"--prompts {source!r} is neither a task ({', '.join(task_names())}) nor a file"
        )
    return list(dict.fromkeys(read_prompts(source, "--prompts"))), None


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
    """K decoded answers per prompt from one batched generate call (B = len(prompts) * K), each up to
    max_new_tokens long (a prompt without that much room in the context is refused, named); empty answers
    are resampled up to `retries` times, and a prompt that still has one gets None (rankings need text)."""
    ids = [encode_prompt(tok, p) for p in prompts]
    check_room(model, prompts, ids, max_new_tokens)
    answers: list[list[str]] = [[""] * k for _ in prompts]
    todo = [(i, j) for i in range(len(prompts)) for j in range(k)]
    for _ in range(1 + retries):
        if not todo:
            break
        g = generate(
            model,
            [ids[i] for i, _ in todo],
            max_new_tokens,
            eos_token_id=tok.eot_id,
            generator=generator,
            **sampling,
        )
        for (i, j), row, mask in zip(todo, g.responses.tolist(), g.response_mask.tolist()):
            answers[i][j] = decode_response(tok, [t for t, m in zip(row, mask) if m])
        todo = [(i, j) for i, j in todo if not answers[i][j].strip()]
    return [None if any(not a.strip() for a in row) else row for row in answers]


def check_room(model: GPT, prompts: list[str], ids: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt leaves max_new_tokens of room in the context (else a batch would cut all its answers
    to the room its longest prompt leaves)."""
    size = model.config.block_size
    for prompt, x in zip(prompts, ids):
        if len(x) + max_new_tokens > size:
            raise ValueError(
                f"prompt {prompt[:60]!r} is {len(x)} tokens: with max_new_tokens {max_new_tokens} it needs "
                f"{len(x) + max_new_tokens} > the model's block_size {size}; shorten it or lower max_new_tokens"
            )


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The sampling generator of prompt chunk `chunk` (prompts [chunk * batch_prompts, ...) of the list)."""
    digest = hashlib.sha256(f"label/{seed}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


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
    skipped because an answer stayed empty. Prompts are sampled in fixed chunks of batch_prompts, each
    with its own generator (chunk_generator): a prompt's answers depend only on the seed and its index
    (given batch_prompts), so an interrupted run resumes with the answers an uninterrupted one gives
    (a chunk partly ranked before is sampled whole again, its ranked prompts left alone)."""
    from tqdm import tqdm

    from fastrlhf.data.formats import read_rankings
    from fastrlhf.labeling.labelers import label_prompts

    done = {r.prompt for r in read_rankings(out)} if Path(out).is_file() else set()
    todo = [p for p in prompts if p not in done]
    check_room(model, prompts, [encode_prompt(tok, p) for p in prompts], max_new_tokens)  # before any work
    no_answer = [0]

    bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress)

    def items() -> Iterator[tuple[str, list[str]]]:
        for c in range((len(prompts) + batch_prompts - 1) // batch_prompts):
            chunk = prompts[c * batch_prompts : (c + 1) * batch_prompts]
            if all(p in done for p in chunk):
                continue
            gen = chunk_generator(seed, c)
            answers = sample_answers(model, tok, chunk, k, max_new_tokens, generator=gen, **sampling)
            for prompt, a in zip(chunk, answers):
                if prompt in done:
                    continue
                bar.update(1)
                if a is None:
                    no_answer[0] += 1
                else:
                    yield prompt, a

    with RunLock.for_file(out, "ranking"):  # a second labeler on this file stops here, naming this one
        stats = label_prompts(labeler, items(), out)
    bar.close()
    stats.skipped += len(prompts) - len(todo)
    return stats, no_answer[0]
