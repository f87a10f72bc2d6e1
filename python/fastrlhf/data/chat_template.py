"""Chat templates: the Jinja template a model ships (tokenizer_config.json's `chat_template`, a
`chat_template.jinja` file, or GGUF's `tokenizer.chat_template`) rendered the way transformers renders it
(utils/chat_template_utils.py): a sandboxed, immutable environment with trim_blocks and lstrip_blocks, the
loop-controls extension, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the
tokenizer's named special tokens (bos_token, eos_token, ...) beside `messages` and `add_generation_prompt`."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

Message = Mapping[str, Any]
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters (<, >, &), which would change what the model sees
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached: templates are re-rendered for every prompt). A template that does not
    parse raises ValueError with Jinja's message and line."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not parse (line {exc.lineno}): {exc.message}") from None


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """The chat as the model's template writes it. special_tokens: {"bos_token": "<s>", "eos_token": ...},
    as transformers passes its special_tokens_map; kwargs (tools, documents, enable_thinking, ...) override
    them, as in transformers. A template that fails raises ValueError carrying the template's own message."""
    import jinja2

    if not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts; got none")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content'; got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}  # as transformers: a None field is absent
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        if reasoning is not None:  # transformers' _alias_reasoning_fields: templates read either name
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    context = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    try:
        return compile_template(template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **context
        )
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template failed to render: {exc.message or exc}") from None
    except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
        raise ValueError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from None


def pick_template(template: str | Sequence[Mapping[str, str]] | None, name: str = "default") -> str | None:
    """tokenizer_config.json's chat_template is a string or a list of {"name", "template"}: the named one."""
    if template is None or isinstance(template, str):
        return template
    named = {t["name"]: t["template"] for t in template}
    if name not in named:
        raise ValueError(f"no chat template named {name!r}; the tokenizer has {sorted(named)}")
    return named[name]
