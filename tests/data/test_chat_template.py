import json

import pytest
from fastrlhf.data import load_tokenizer
from fastrlhf.data.chat_template import pick_template, render_chat
from helpers.hf_tokenizers import STYLES, save_transformers_folder

transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [
        {"role": "system", "content": "You answer in French, briefly.  "},
        {"role": "user", "content": "Bonjour ! Ça va ?"},
        {"role": "assistant", "content": "Oui, merci.", "tool_calls": None},
        {"role": "user", "content": "  and 日本語 🙂 <|im_end|>\n"},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b <tag> & é",
                                           "parameters": {"a": {"type": "int"}, "b": {"type": "int"}}}}]  # fmt: skip
TOOL_CHAT = [
    {"role": "user", "content": "add 2 and 3"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
    },
    {"role": "tool", "content": "5"},
]


@pytest.fixture(scope="module", params=list(STYLES))
def folder(request, tmp_path_factory):
    path = save_transformers_folder(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_apply_chat_template_equals_transformers(folder, add_generation_prompt):
    style, path, theirs = folder
    ours = load_tokenizer(path)
    assert ours.chat_template == STYLES[style][-1]
    for chat in CHATS:
        kw = dict(add_generation_prompt=add_generation_prompt)
        text = ours.apply_chat_template(chat, tokenize=False, **kw)
        assert text == theirs.apply_chat_template(chat, tokenize=False, **kw)
        assert ours.apply_chat_template(chat, **kw) == theirs.apply_chat_template(chat, **kw)["input_ids"]
        assert text.endswith(("assistant\n", "assistant<|end_header_id|>\n\n")) == add_generation_prompt
    if style == "llama3":
        assert ours.apply_chat_template(CHATS[0], tokenize=True)[0] == ours.bos_id  # the template writes BOS
        assert "Today Date: " in text  # strftime_now
    if style == "qwen25":  # tools through tojson (non-ASCII and <, & kept), tool calls and tool results
        for chat in (CHATS[0], TOOL_CHAT):
            text = ours.apply_chat_template(chat, tools=TOOLS, tokenize=False)
            assert text == theirs.apply_chat_template(
                chat, tools=TOOLS, add_generation_prompt=True, tokenize=False
            )
        assert '"description": "a + b <tag> & é"' in text and '{"a": 2, "b": 3}' in text


def test_template_errors_are_value_errors_with_the_template_message(tmp_path):
    save_transformers_folder("llama3", tmp_path)
    tok = load_tokenizer(tmp_path)
    with pytest.raises(
        ValueError, match="failed to render: Conversation roles must be user or assistant; got tool"
    ):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match="the chat template does not parse \\(line 1\\): .*'endfor'"):
        render_chat("{% for m in messages %}{{ m }}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="failed to render: .*'role'"):
        render_chat("{{ messages[0]['role'] + 1 }}", [{"content": "a"}])
    with pytest.raises(ValueError, match="failed to render: TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="access to attribute '__class__'|unsafe"):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        render_chat("x", [])
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict"):
        render_chat("x", ["hello"])
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "chat_template"})
    )
    with pytest.raises(ValueError, match="this tokenizer has no chat template"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "a"}])


def test_named_templates_and_kwargs():
    named = [{"name": "default", "template": "D{{ x }}"}, {"name": "tool_use", "template": "T"}]
    assert pick_template(named) == "D{{ x }}" and pick_template(named, "tool_use") == "T"
    assert pick_template("plain") == "plain" and pick_template(None) is None
    with pytest.raises(
        ValueError, match="no chat template named 'rag'; the tokenizer has \\['default', 'tool_use'\\]"
    ):
        pick_template(named, "rag")
    msgs = [{"role": "user", "content": "a"}]
    out = render_chat(
        "{{ bos_token }}{{ x }}|{{ y }}|", msgs, special_tokens={"bos_token": "<s>", "y": "?"}, x=1, y=2
    )
    assert out == "<s>1|2|"  # caller kwargs override the special tokens, as in transformers
    # trim_blocks + lstrip_blocks: block tags leave no newline or indentation behind
    assert render_chat("{% if true %}\n  a\n  {% endif %}\nb", msgs) == "  a\nb"


@pytest.mark.parametrize("style", list(STYLES))
def test_assistant_mask_covers_answers_and_their_end_token(tmp_path, style):
    tok = load_tokenizer(save_transformers_folder(style, tmp_path))
    chat = [*CHATS[1], {"role": "assistant", "content": "Très bien, 391."}]
    ids, mask = tok.encode_chat_with_mask(chat)
    assert ids == tok.apply_chat_template(chat, add_generation_prompt=False) and len(mask) == len(ids)
    spans, run = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            spans, run = [*spans, run], []
    spans += [run] if run else []
    eos = tok.decode([tok.eot_id])
    assert [tok.decode(s) for s in spans] == [f"Oui, merci.{eos}", f"Très bien, 391.{eos}"]


def test_reasoning_fields_are_aliased_as_in_transformers(folder):
    _, path, theirs = folder
    template = (
        "{% for m in messages %}[{{ m.thinking }}|{{ m.reasoning_content }}]{{ m.content }}{% endfor %}"
    )
    chat = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    ours = load_tokenizer(path).apply_chat_template(chat, chat_template=template, tokenize=False)
    assert ours == "[2+2|2+2]4" == theirs.apply_chat_template(chat, chat_template=template, tokenize=False)
