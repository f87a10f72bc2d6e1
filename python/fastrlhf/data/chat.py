"""A minimal prompt/response format shared by SFT, reward modelling, PPO and `generate`:

    "Prompt: {prompt}\nResponse:" + " {response}" + <|endoftext|>

Plain text markers work with any tokenizer (no new embeddings for GPT-2); <|endoftext|> is added by id
so it ends every response, and the loss/reward masks cover the response tokens and that EOT."""

from __future__ import annotations

from fastrlhf.data.tokenizer import Tokenizer

PROMPT_PREFIX = "Prompt: "
RESPONSE_PREFIX = "\nResponse:"


def format_prompt(prompt: str) -> str:
    return f"{PROMPT_PREFIX}{prompt}{RESPONSE_PREFIX}"


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    return tok.encode(format_prompt(prompt))


def encode_chat(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[bool]]:
    """ids of prompt + response + EOT and a mask that is True on the response tokens and the EOT."""
    p = encode_prompt(tok, prompt)
    r = tok.encode(" " + response) + [tok.eot_id]
    return p + r, [False] * len(p) + [True] * len(r)


def decode_response(tok: Tokenizer, ids: list[int]) -> str:
    """The response text of generated ids: cut at the first EOT, one leading space dropped."""
    if tok.eot_id in ids:
        ids = ids[: ids.index(tok.eot_id)]
    text = tok.decode(ids)
    return text.removeprefix(" ")
