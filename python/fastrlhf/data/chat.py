"""The prompt/response format shared by SFT, reward modelling, labeling, PPO and `generate`.

A chat model's tokenizer (one with a chat template) formats a prompt as one user turn (or a prompt's own
conversation, data/messages.py) and the response as the assistant's turn, with the model's own template.
Every other tokenizer uses a minimal plain format (a conversation as "role: content" lines):

    "Prompt: {prompt}\nResponse:" + " {response}" + <|endoftext|>

Plain text markers work with any tokenizer (no new embeddings for GPT-2); <|endoftext|> is added by id
so it ends every response. Either way the loss/reward masks cover the response tokens and its end token."""

from __future__ import annotations

from fastrlhf.data.messages import Prompt, as_messages, plain_prompt
from fastrlhf.data.tokenizer import Tokenizer

PROMPT_PREFIX = "Prompt: "
RESPONSE_PREFIX = "\nResponse:"


def format_prompt(prompt: Prompt) -> str:
    return f"{PROMPT_PREFIX}{plain_prompt(prompt)}{RESPONSE_PREFIX}"


def encode_prompt(tok: Tokenizer, prompt: Prompt) -> list[int]:
    """The ids a model answers from: the user turn and the assistant's header (chat template), or
    "Prompt: ...\nResponse:"."""
    if tok.chat_template:
        return tok.apply_chat_template(as_messages(prompt), add_generation_prompt=True)
    return tok.encode(format_prompt(prompt))


def encode_chat(tok: Tokenizer, prompt: Prompt, response: str) -> tuple[list[int], list[bool]]:
    """ids of prompt + response + its end and a mask that is True on the response tokens and the end
    (with a chat template: the assistant turn as the template writes it, end-of-turn token included)."""
    p = encode_prompt(tok, prompt)
    if tok.chat_template:
        turns = [*as_messages(prompt), {"role": "assistant", "content": response}]
        full = tok.apply_chat_template(turns, add_generation_prompt=False)
        if full[: len(p)] != p:
            raise ValueError(
                "the chat template renders a conversation that does not start with its own prompt"
            )
        r = full[len(p) :]
        if (
            tok.eot_id in r
        ):  # the turn ends at its end token; what a template writes after it is not trained on
            r = r[: r.index(tok.eot_id) + 1]
        return p + r, [False] * len(p) + [True] * len(r)
    r = tok.encode(" " + response) + [tok.eot_id]
    return p + r, [False] * len(p) + [True] * len(r)


def decode_response(tok: Tokenizer, ids: list[int]) -> str:
    """The response text of generated ids: cut at the first end token (the plain format's one leading
    space dropped)."""
    if tok.eot_id in ids:
        ids = ids[: ids.index(tok.eot_id)]
    text = tok.decode(ids)
    return text if tok.chat_template else text.removeprefix(" ")
