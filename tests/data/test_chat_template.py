"""Chat templates and HF tokenizer folders: ids equal transformers' for ChatML (SmolLM2's), Llama-3-style
and Qwen2.5-style templates on a tokenizer built in the test; a template that fails names its error."""

from __future__ import annotations

import json

import pytest
import transformers
from fastrlhf import load_tokenizer
from fastrlhf.data.chat_template import render_chat
from fastrlhf.data.hf_tokenizer import HFTokenizer

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 37+45?  Tell me ünïcode too 😀"},
    {"role": "assistant", "content": " 82 "},
    {"role": "user", "content": "And 1+1?"},
]


def folder(tmp_path, template, eos, bos=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["What is 37+45? Be brief. assistant user system You are a helpful AI assistant"] * 20
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": bos,
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize(
    ("template", "eos", "bos"),
    [(CHATML, "<|im_end|>", None), (LLAMA3, "<|eot_id|>", "<|begin_of_text|>"), (QWEN, "<|im_end|>", None)],
    ids=["chatml", "llama3", "qwen"],
)
def test_chat_ids_equal_transformers(tmp_path, template, eos, bos):
    path = folder(tmp_path, template, eos, bos)
    ours = HFTokenizer.from_folder(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for n, gen in ((2, True), (3, False), (4, True)):
        want = theirs.apply_chat_template(MESSAGES[:n], add_generation_prompt=gen, tokenize=False)
        got = ours.apply_chat_template(MESSAGES[:n], add_generation_prompt=gen)
        assert got == theirs(want, add_special_tokens=False)["input_ids"]
        assert ours.decode(got) == want
    assert ours.eot_id == theirs.convert_tokens_to_ids(eos)
    ours.save(tmp_path / "saved")
    again = load_tokenizer_folder(tmp_path / "saved")
    assert again.apply_chat_template(MESSAGES[:2], add_generation_prompt=True) == ours.apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True
    )


def load_tokenizer_folder(path):
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")  # an HF model folder as far as load_tokenizer looks
    return load_tokenizer(path)


def test_a_template_that_fails_gives_its_own_message():
    with pytest.raises(ValueError, match="failed to render: only user turns, please"):
        render_chat("{{ raise_exception('only user turns, please') }}", MESSAGES)
    with pytest.raises(ValueError, match="does not compile"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict with string 'role' and 'content'"):
        render_chat(CHATML, [{"role": "user"}])
