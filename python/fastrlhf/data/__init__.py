"""Tokenizers (our own and pretrained models' with their chat templates), corpora, token files and the chat format."""

from fastrlhf.data.chat import decode_response, encode_chat, encode_prompt, format_prompt
from fastrlhf.data.hf_tokenizer import HFTokenizer
from fastrlhf.data.loading import load_tokenizer
from fastrlhf.data.tokenizer import EOT, ByteBPETokenizer, GPT2Tokenizer, Tokenizer
from fastrlhf.data.tokens import TokenFile, random_batch, write_tokens

__all__ = [
    "EOT",
    "ByteBPETokenizer",
    "GPT2Tokenizer",
    "HFTokenizer",
    "TokenFile",
    "Tokenizer",
    "decode_response",
    "encode_chat",
    "encode_prompt",
    "format_prompt",
    "load_tokenizer",
    "random_batch",
    "write_tokens",
]
