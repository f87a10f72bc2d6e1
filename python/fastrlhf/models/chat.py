"""A multi-turn conversation with a model: its chat template over the turns so far, the answer sampled
with the KV cache and streamed piece by piece as its tokens come."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastrlhf.models.generate import generate
from fastrlhf.models.transformer import CausalLM


class Chat:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        *,
        system: str = "",
        max_new_tokens: int = 256,
        generator: torch.Generator | None = None,
        **sampling: Any,
    ):
        if not tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use `python -m fastrlhf generate`")
        self.model, self.tok, self.system, self.sampling = model, tokenizer, system, sampling
        self.max_new_tokens, self.generator = max_new_tokens, generator
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system}] if self.system else []
        )

    def say(self, text: str, stream: Callable[[str], None] = lambda s: None) -> str:
        """The model's answer to `text` (added to the conversation, as is the answer); stream(piece) is
        called with each new piece of the answer's text as it is sampled."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tok.apply_chat_template(self.messages, add_generation_prompt=True)
        room = self.model.config.block_size - len(ids)
        if room < 1:
            self.messages.pop()
            raise ValueError(f"the conversation ({len(ids)} tokens) fills the context; /reset to start over")
        answer: list[int] = []
        shown = [""]

        def on_token(tokens: Tensor) -> None:
            t = int(tokens[0])
            if t == self.tok.eot_id:
                return
            answer.append(t)
            text_now = self.tok.decode(answer)
            if not text_now.endswith("\ufffd"):  # a multi-byte character is complete
                stream(text_now[len(shown[0]) :])
                shown[0] = text_now

        generate(
            self.model,
            [ids],
            min(self.max_new_tokens, room),
            eos_token_id=self.tok.eot_id,
            generator=self.generator,
            on_token=on_token,
            **self.sampling,
        )
        reply = self.tok.decode(answer)
        if len(reply) > len(shown[0]):
            stream(reply[len(shown[0]) :])
        self.messages.append({"role": "assistant", "content": reply})
        return reply
