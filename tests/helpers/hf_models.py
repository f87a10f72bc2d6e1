"""A tiny random-init Llama saved by transformers, with a ChatML (SmolLM2-style) tokenizer and chat template:
what a user's Hugging Face model folder looks like, built in seconds and nothing downloaded."""

import torch

from helpers.hf_tokenizers import save_transformers_folder


def tiny_llama_folder(folder, seed=0, context=96):
    import transformers

    save_transformers_folder("smollm2", folder)
    vocab = len(transformers.PreTrainedTokenizerFast.from_pretrained(folder))
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
