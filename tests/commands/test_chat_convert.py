"""`chat` through a pseudo-terminal (prompt, streamed answer, /reset, /quit) and `convert` to an HF folder
that transformers loads, on a small random Llama with a ChatML tokenizer built in the test."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import torch
import transformers
from fastrlhf import from_pretrained
from fastrlhf.data.hf_tokenizer import HFTokenizer
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_model(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["hello there, how are you today"] * 10,
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "chat_template": CHATML})
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=hf_tok.vocab_size,
            block_size=256,
            n_layer=1,
            n_head=2,
            n_kv_head=1,
            n_embd=16,
            intermediate_size=24,
        )
    )
    model.save_pretrained(path, hf_tok)
    return model


def read_until(fd, marker: bytes, timeout: float = 60) -> bytes:
    out, end = b"", time.monotonic() + timeout
    while marker not in out:
        assert time.monotonic() < end, f"no {marker!r} on the terminal; it shows {out!r}"
        if select.select([fd], [], [], 0.1)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_chat_in_a_terminal_streams_answers_resets_and_quits(tmp_path):
    tiny_chat_model(tmp_path / "m")
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastrlhf",
            "chat",
            str(tmp_path / "m"),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ],
        stdin=child,
        stdout=child,
        stderr=child,
        close_fds=True,
    )
    os.close(child)
    try:
        assert b"/reset starts over" in read_until(main, b"> ")
        os.write(main, b"hello there\n")
        answer = read_until(main, b"> ")
        assert len(answer.strip()) > len(b"hello there")  # the echoed line, then the streamed answer
        os.write(main, b"/reset\n")
        assert b"(new conversation)" in read_until(main, b"> ")
        os.write(main, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(main)


def test_convert_writes_a_folder_transformers_loads(tmp_path):
    model = tiny_chat_model(tmp_path / "m")
    out = subprocess.run(
        [sys.executable, "-m", "fastrlhf", "convert", str(tmp_path / "m"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 280, (1, 7))
    with torch.no_grad():
        assert (hf(x).logits - model.eval()(x)[0]).abs().max() < 1e-4
        assert torch.equal(from_pretrained(tmp_path / "out")(x)[0], model(x)[0])


def test_generate_and_chat_sample_with_bf16_weights(tmp_path, capsys):
    """--dtype bf16 loads the weights as bf16 for sampling (half the bytes a decoded token reads)."""
    import pytest
    from fastrlhf.cli import main
    from fastrlhf.models.generate import sampling_dtype

    tiny_chat_model(tmp_path / "m")
    args = ["--checkpoint", str(tmp_path / "m"), "--max-new-tokens", "4", "--temperature", "0", "--chat"]
    assert main(["generate", "hello there", *args, "--dtype", "bf16"]) == 0
    assert "=== " in capsys.readouterr().out
    assert sampling_dtype("bf16") is torch.bfloat16 and sampling_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="--dtype must be 'fp32' or 'bf16'; got 'fp16'"):
        sampling_dtype("fp16")
    assert from_pretrained(tmp_path / "m", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
