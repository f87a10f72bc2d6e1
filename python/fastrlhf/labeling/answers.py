"""`python -m fastrlhf label`: sample K answers per prompt from an SFT model and rank them.

    python -m fastrlhf label --sft runs/sft --prompts arithmetic --k 4 --labeler arithmetic --out rankings.jsonl

Prompts are a built-in task's (--split train|heldout) or a file: one prompt per line, or JSONL objects
with a "prompt" field. Answers come from batched KV-cache generation (ops.sample); every ranking is
appended to --out the moment it is made (train.labelers.label_prompts), and a rerun resumes: prompts
already in --out are neither sampled nor shown again."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from fastrlhf.data import Tokenizer, decode_response, encode_prompt
from fastrlhf.data.prompts import read_prompts
from fastrlhf.io.files import atomic_write_text
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


class ResumePoint:
    """`.<out>.resume` beside the rankings file: the sampling generator's state at the start of the chunk
    being labeled, written before the chunk is sampled. A run that resumes within that chunk restores it,
    so it samples the answers the interrupted run drew (and an uninterrupted one draws); removed when the
    labeling ends."""

    def __init__(self, out: Path, seed: int, batch_prompts: int):
        self.path = out.parent / f".{out.name}.resume"
        self.key = {"seed": seed, "batch_prompts": batch_prompts}

    def read(self, prompts: list[str]) -> tuple[int, torch.Generator] | None:
        """(chunk, its generator) saved for this seed, chunking and these prompts; None if none."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        c, n = saved.get("chunk", -1), self.key["batch_prompts"]
        if saved.get("key") != self.key or saved.get("prompts") != _digest(prompts[c * n : (c + 1) * n]):
            return None
        gen = torch.Generator()
        gen.set_state(torch.frombuffer(bytearray(base64.b64decode(saved["state"])), dtype=torch.uint8))
        return c, gen

    def write(self, c: int, chunk: list[str], gen: torch.Generator) -> None:
        state = base64.b64encode(gen.get_state().numpy().tobytes()).decode()
        data = {"key": self.key, "chunk": c, "prompts": _digest(chunk), "state": state}
        atomic_write_text(self.path, json.dumps(data))


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


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
    skipped because an answer stayed empty. Prompts are sampled in chunks of batch_prompts taken in order
    from `prompts` (a chunk holding a prompt already ranked is sampled whole, its ranked prompts left
    alone), from one generator seeded with `seed` whose state at each chunk's start is kept (ResumePoint):
    a prompt's answers depend only on the seed and its index, so an interrupted run resumes with the
    answers an uninterrupted one gives."""
    from tqdm import tqdm

    from fastrlhf.data.formats import read_rankings
    from fastrlhf.labeling.labelers import label_prompts

    out = Path(out)
    check_room(model, prompts, [encode_prompt(tok, p) for p in prompts], max_new_tokens)  # before any work
    lock = RunLock.for_file(out, "ranking").acquire()  # a second labeler on `out` stops here, naming this one
    try:
        done = {r.prompt for r in read_rankings(out)} if out.is_file() else set()
        resume = ResumePoint(out, seed, batch_prompts)
        first, gen = resume.read(prompts) or (0, torch.Generator().manual_seed(seed))
        earlier = prompts[: first * batch_prompts]  # chunks the interrupted run finished
        todo = [p for p in prompts[len(earlier) :] if p not in done]
        no_answer = [sum(p not in done for p in earlier)]  # their prompts left unranked had an empty answer
        bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress)

        def items() -> Iterator[tuple[str, list[str]]]:
            for c in range(first, (len(prompts) + batch_prompts - 1) // batch_prompts):
                chunk = prompts[c * batch_prompts : (c + 1) * batch_prompts]
                if all(p in done for p in chunk):
                    continue
                resume.write(c, chunk, gen)
                answers = sample_answers(model, tok, chunk, k, max_new_tokens, generator=gen, **sampling)
                for prompt, a in zip(chunk, answers):
                    if prompt in done:
                        continue
                    bar.update(1)
                    if a is None:
                        no_answer[0] += 1
                    else:
                        yield prompt, a
            resume.path.unlink(missing_ok=True)  # every chunk sampled and ranked

        stats = label_prompts(labeler, items(), out)
        bar.close()
    finally:
        lock.release()
    stats.skipped += sum(p in done for p in prompts)
    return stats, no_answer[0]
