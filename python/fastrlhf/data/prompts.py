"""The one prompts-file reader of every command (label, ppo, generate, the pipeline): a `.jsonl` file holds
one JSON object per line with a string field "prompt"; any other file holds one prompt per line, with `\\n`
standing for a newline inside a prompt. Blank lines are skipped; errors name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path, what: str = "prompts file") -> list[str]:
    """The prompts of a file, in file order (duplicates kept). `what` names the argument in errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a prompts file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
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
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"{what} {path} holds no prompts")
    return prompts
