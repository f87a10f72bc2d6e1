"""Pretrained models' tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` library (the ids
transformers' fast tokenizer gives), or a GGUF file's byte-level BPE vocabulary built into the same kind of
tokenizer, with the model's special tokens and its chat template (data/chat_template.py).

Unlike the project's own tokenizers, `encode` here parses the special tokens of the text, as transformers
does: a chat template's rendered text spells them (`<|im_start|>user`) and they must become their ids."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastrlhf.data.chat_template import render_chat
from fastrlhf.data.tokenizer import CONFIG_FILE, Tokenizer

CONTROL = 3  # GGUF token_type of control (special) tokens


def _token_text(t: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return t.get("content") if isinstance(t, dict) else t


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(
        self,
        tok,
        *,
        eos: str,
        bos: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos_id = tok.token_to_id(eos)
        if eos_id is None:
            raise ValueError(f"the tokenizer has no id for its end-of-sequence token {eos!r}")
        self.eos, self.bos, self.eot_id = eos, bos, eos_id
        self.chat_template, self.add_bos = chat_template, add_bos

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._tok.token_to_id(self.bos), *ids] if self.add_bos and self.bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> list[int]:
        """The ids of messages rendered with the model's chat template (as transformers' apply_chat_template)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos or "",
            eos_token=self.eos,
        )
        return self._tok.encode(text, add_special_tokens=False).ids

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos,
            "bos_token": self.bos,
            "add_bos_token": self.add_bos,
            "model_max_length": 1 << 30,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        """tokenizer.json + tokenizer_config.json (special tokens, chat template), and generation_config.json's
        eos_token_id where the config names none."""
        from tokenizers import Tokenizer as Tok

        folder = Path(folder)
        tok = Tok.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
        eos = _token_text(cfg.get("eos_token"))
        if eos is None and (folder / "generation_config.json").is_file():
            eos_id = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
            eos = (
                tok.id_to_token(eos_id[0] if isinstance(eos_id, list) else eos_id)
                if eos_id is not None
                else None
            )
        if eos is None:
            raise ValueError(
                f"{folder}: no end-of-sequence token (eos_token in {CONFIG_FILE} or generation_config.json)"
            )
        return cls(
            tok,
            eos=eos,
            bos=_token_text(cfg.get("bos_token")),
            chat_template=cfg.get("chat_template"),
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> HFTokenizer:
        """The tokenizer of a GGUF file's tokenizer metadata (io.gguf.read_gguf's third value): byte-level
        BPE ("gpt2" model) with its merges, control tokens as special tokens."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Tok

        if meta.get("model") != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {meta.get('model')!r} is not supported (only byte-level BPE, 'gpt2')"
            )
        tokens, types = meta["tokens"], meta.get("token_type") or [1] * len(meta["tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or []]
        tok = Tok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if meta.get("pre") in ("smollm", "starcoder", "refact", "deepseek-coder"):  # each digit its own token
            steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
        )
        name = lambda key: tokens[meta[key]] if meta.get(key) is not None else None
        return cls(
            tok,
            eos=name("eos_token_id"),
            bos=name("bos_token_id"),
            chat_template=meta.get("chat_template"),
            add_bos=bool(meta.get("add_bos_token", False)),
        )
