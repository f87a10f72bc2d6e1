"""A model's chat template (the Jinja2 template in tokenizer_config.json or GGUF metadata) rendered the way
transformers renders it: a sandboxed environment with trim_blocks and lstrip_blocks, loop controls, the
`raise_exception` and `strftime_now` globals and a `tojson` filter that keeps non-ASCII text."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from typing import Any


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)  # reported as the template's own error below


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@cache
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from None


def render_chat(
    template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = False, **special: str
) -> str:
    """The text of messages ([{"role": ..., "content": ...}, ...]) under the template; a template that
    fails to render is a ValueError with its own message."""
    import jinja2
    import jinja2.ext

    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TypeError(f"messages[{i}] must be a dict with string 'role' and 'content'; got {m!r}")
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template failed to render: {exc}") from None
