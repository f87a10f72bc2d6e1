"""Pretrained models' tokenizers: a Hugging Face `tokenizer.json` (through the `tokenizers` library, so ids are
transformers' fast tokenizer's) or a GGUF vocabulary rebuilt the way transformers' GGUF loader rebuilds it;
special tokens from tokenizer_config.json / special_tokens_map.json / generation_config.json, and the model's
chat template. Fits the project's Tokenizer interface, so the recipe runs on it unchanged."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastrlhf.data.chat_template import Message, pick_template, render_chat
from fastrlhf.data.tokenizer import Tokenizer, byte_decoder

NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILE, CONFIG_FILE, SPECIALS_FILE = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TEMPLATE_FILE, GENERATION_FILE = "chat_template.jinja", "generation_config.json"

# llama.cpp's `tokenizer.ggml.pre` -> the split regex its merges were learned with (transformers'
# GGUF_PRE_TOKENIZER_SPLITS, integrations/gguf/gguf_tokenizer_mapping.py); others get GPT-2's ByteLevel split
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GGUF_SPLITS = dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3)
GGUF_SPLITS |= dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2)
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, Mapping) else token


class HFTokenizer(Tokenizer):
    """A pretrained model's tokenizer. `encode(text)` reads special-token strings as plain text (a document
    cannot inject an <|im_end|>); `encode(text, special=True)` and `apply_chat_template` read them as the
    special tokens, as transformers does. eot_id is the EOS that ends an answer; stop_ids adds the other
    EOS ids of generation_config.json (Llama 3 lists three)."""

    kind = "hf"

    def __init__(self, tok, config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None):
        from tokenizers import AddedToken

        self._tok = tok
        self.config = dict(config)  # tokenizer_config.json's content, written back by save()
        self.generation_config = dict(generation_config or {})
        self.chat_template: str | None = pick_template(self.config.get("chat_template"))
        self.special_tokens = {k: _content(self.config[k]) for k in NAMED_SPECIALS if self.config.get(k)}
        # as transformers does: a named special token the vocabulary has but tokenizer.json does not list as
        # added becomes a special added token, so a template's "</s>" is that one id, not "</", "s", ">"
        added = {str(t.content) for t in tok.get_added_tokens_decoder().values()}
        missing = [
            t for t in self.special_tokens.values() if t not in added and tok.token_to_id(t) is not None
        ]
        tok.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(missing)]
        )
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids may have holes; the embedding needs max id + 1 rows
        gen_eos = self.generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos = self.special_tokens.get("eos_token")
        if eos is None and gen_eos:
            eos = tok.id_to_token(gen_eos[0])
            self.special_tokens["eos_token"] = eos
        if eos is None or tok.token_to_id(eos) is None:
            raise ValueError(
                f"the tokenizer has no EOS token in its vocabulary (eos_token={eos!r}); cannot end answers"
            )
        self.eot_id = tok.token_to_id(eos)
        self.stop_ids = [self.eot_id, *(i for i in gen_eos if i != self.eot_id)]
        ids = lambda k: tok.token_to_id(self.special_tokens[k]) if k in self.special_tokens else None
        self.bos_id, self.pad_id = ids("bos_token"), ids("pad_token")
        if self.pad_id is None and isinstance(self.generation_config.get("pad_token_id"), int):
            self.pad_id = self.generation_config["pad_token_id"]
        # whether the model's tokenizer starts plain text with BOS (Llama 3 does, SmolLM2 and Qwen do not):
        # tokenizer_config's add_bos_token when it says, else what tokenizer.json's post-processor does
        probe = tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = self.bos_id is not None and bool(self.config.get("add_bos_token", probe))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        """An HF tokenizer folder (or model folder): tokenizer.json and its tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja and generation_config.json when present."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"no Hugging Face tokenizer in {folder}: {TOKENIZER_FILE} is missing")
        try:
            tok = Backend.from_file(str(folder / TOKENIZER_FILE))
        except Exception as exc:  # the rust side raises plain Exception on malformed files
            raise ValueError(f"{folder / TOKENIZER_FILE} is not a readable tokenizer.json: {exc}") from exc
        read = lambda name: _read_json(folder / name) if (folder / name).is_file() else {}
        config = read(CONFIG_FILE)
        for k, v in read(SPECIALS_FILE).items():  # tokenizer_config.json wins, as in transformers
            if k in NAMED_SPECIALS and not config.get(k):
                config[k] = v
        if (folder / TEMPLATE_FILE).is_file():  # transformers >= 4.51 writes the template beside the config
            config["chat_template"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(tok, config, read(GENERATION_FILE) or None)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer a GGUF file describes (byte-level BPE, `tokenizer.ggml.model = "gpt2"`)."""
        from fastrlhf.io.gguf import read_gguf_metadata

        meta = read_gguf_metadata(path)
        tok, config = gguf_tokenizer(meta, source=str(path))
        generation = (
            {"eos_token_id": meta["tokenizer.ggml.eos_token_id"]}
            if "tokenizer.ggml.eos_token_id" in meta
            else None
        )
        return cls(tok, config, generation)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of text, without a BOS. special=False: special-token strings are plain text."""
        self._tok.encode_special_tokens = not special
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        self._tok.encode_special_tokens = not special
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        """{token as the vocabulary spells it (GPT-2's byte alphabet): id}, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """The chat rendered with the model's template, as ids (tokenize=True) or text: equal to
        transformers' `apply_chat_template(messages, add_generation_prompt=...)` for the same folder."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json or the GGUF)"
            )
        text = render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )
        return self.encode(text, special=True) if tokenize else text

    def encode_chat_with_mask(
        self, messages: Sequence[Message], **kwargs: Any
    ) -> tuple[list[int], list[bool]]:
        """ids of a whole chat (no generation prompt) and a mask that is True on each assistant turn's
        tokens through its end-of-turn token (EOS), for a loss on the assistant turns only. The turns are
        found by rendering the chat up to each assistant message, so the template must render a chat as a
        prefix of its continuation (ChatML, Llama 3 and Qwen2.5 do; Qwen3's drops old <think> blocks)."""
        ids = self.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
        mask = [False] * len(ids)
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.apply_chat_template(messages[:i], **kwargs) if i else []
            through = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False, **kwargs)
            if ids[: len(through)] != through or through[: len(before)] != before:
                raise ValueError(
                    f"the chat template renders messages[:{i + 1}] differently inside the longer chat; "
                    "cannot tell the assistant's tokens apart"
                )
            span = range(len(before), len(through))
            end = next((j for j in span if ids[j] in self.stop_ids), span.stop - 1)
            mask[span.start : end + 1] = [True] * (end + 1 - span.start)
        return ids, mask

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json, which
        transformers' AutoTokenizer and load_tokenizer both read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.encode_special_tokens = False
        self._tok.save(str(folder / TOKENIZER_FILE))
        config = dict(self.config)  # the template as it came: a string, or transformers' list of named ones
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (folder / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (folder / TEMPLATE_FILE).unlink(missing_ok=True)  # it would override the template just written
        specials = json.dumps(self.special_tokens, indent=2, ensure_ascii=False) + "\n"
        (folder / SPECIALS_FILE).write_text(specials, encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(data).__name__}")  # noqa: TRY004
    return data


def gguf_tokenizer(meta: Mapping[str, Any], source: str = "the GGUF file"):
    """A `tokenizers.Tokenizer` and a tokenizer_config dict from GGUF metadata, built as transformers'
    GGUF loader builds them (byte_level_tokenizer, add_gguf_special_tokens, set_split_regex), so ids match:
    tokens re-spelled in GPT-2's byte alphabet, BPE with the file's merges, control tokens (type 3) added
    as special, user-defined ones (type 4) as plain added tokens, the split regex named by
    `tokenizer.ggml.pre`."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    g = lambda key, default=None: meta.get(f"tokenizer.ggml.{key}", default)
    if g("model") != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {g('model')!r}; only byte-level BPE ('gpt2') vocabularies are supported"
        )
    tokens, types = g("tokens"), g("token_type") or []
    if not tokens or "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    to_unicode = {b: c for c, b in byte_decoder().items()}
    alphabet = set(to_unicode.values())
    spell = lambda t: t if set(t) <= alphabet else "".join(to_unicode[b] for b in t.encode("utf-8"))
    vocab = {spell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in g("merges")]
    bpe = models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix=""
    )
    tok = Backend(bpe)
    split = GGUF_SPLITS.get(g("pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    config: dict[str, Any] = {
        "add_bos_token": bool(g("add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        if (i := g(f"{key}_token_id")) is not None and 0 <= i < len(tokens):
            config[name] = tokens[i]
    # a control token spelled outside the byte alphabet is a llama.cpp mislabel: transformers skips it too
    control = [t for t, k in zip(tokens, types, strict=False) if k == CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if config["add_bos_token"] and "bos_token" in config:
        bos = config["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, vocab.get(bos, tok.token_to_id(bos)))],
        )
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return tok, config
