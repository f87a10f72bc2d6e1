"""Prompts as plain text or as a conversation: the chat-message format of HF datasets and OpenAI
({"role": ..., "content": ...} objects), held as a tuple of Turns so a prompt stays hashable."""

from __future__ import annotations

from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant", "tool")


class Turn(NamedTuple):
    role: str
    content: str


Prompt = str | tuple[Turn, ...]  # a user message's text, or the conversation the answer continues


def parse_messages(value: Any, what: str = "messages") -> tuple[tuple[Turn, ...], str | None]:
    """(turns, None), or ((), what is wrong) for a JSON list of {"role", "content"} objects."""
    if not isinstance(value, list) or not value:
        return (), f"{what} must be a non-empty list of {{'role', 'content'}} objects"
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            keys = sorted(m) if isinstance(m, dict) else type(m).__name__
            return (), f"{what}[{i}] must be an object with exactly 'role' and 'content'; got {keys}"
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            return (), f"{what}[{i}] needs a role in {list(ROLES)} and string content; got {m!r}"
        turns.append(Turn(m["role"], m["content"]))
    return tuple(turns), None


def prompt_problem(prompt: Prompt) -> str | None:
    """A conversation prompt must hold a user turn and end before the answer: its last turn is not the
    assistant's."""
    if isinstance(prompt, str):
        return None
    if not any(t.role == "user" for t in prompt):
        return "a conversation prompt needs a user turn"
    if prompt[-1].role == "assistant":
        return "a conversation prompt must not end with an assistant turn (that is the answer)"
    return None


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The messages a chat template renders: a text prompt is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": t.role, "content": t.content} for t in prompt]


def prompt_json(prompt: Prompt) -> str | list[dict[str, str]]:
    """A prompt as written in JSONL files: the text, or the list of messages."""
    return prompt if isinstance(prompt, str) else as_messages(prompt)


def plain_prompt(prompt: Prompt) -> str:
    """A prompt as one text for models without a chat template: a conversation as 'role: content' lines
    (a lone user turn is its text)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n".join(f"{t.role}: {t.content}" for t in prompt)
