import json

import numpy as np
import pytest
from fastrlhf.data import load_tokenizer
from fastrlhf.data.hf_tokenizer import HFTokenizer, gguf_tokenizer
from helpers.gguf import write_gguf
from helpers.hf_tokenizers import STYLES, save_transformers_folder, train_backend

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox; it's 2024 and we'll count 1234567 apples.",
    "naïve café — 日本語のテキスト, emoji 🙂\n\n  Indented\ttab   trailing   ",
    "",
    " leading space",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a stray <|im_end|> and <|endoftext|>x<|eot_id|>y<|begin_of_text|>",
    "def add(a, b):\r\n    return a + b  # 17 * 23 = 391",
    "Ĝ ĠĠ weird byte-alphabet characters \x00\x7f",
]


@pytest.fixture(scope="module", params=list(STYLES))
def folders(request, tmp_path_factory):
    folder = save_transformers_folder(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, folder, transformers.AutoTokenizer.from_pretrained(folder)


def test_hf_folder_ids_equal_transformers(folders):
    style, folder, theirs = folders
    ours = load_tokenizer(folder)
    assert isinstance(ours, HFTokenizer) and ours.kind == "hf"
    assert ours.vocab_size == len(theirs) and ours.eot_id == theirs.eos_token_id
    assert ours.pad_id == theirs.pad_token_id and ours.bos_id == theirs.bos_token_id
    assert ours.add_bos == (style == "llama3") == (theirs("a")["input_ids"][0] == theirs.bos_token_id)
    for text in TEXTS:
        want = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, special=True) == want, text
        plain = ours.encode(text)
        assert plain == theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], text
        assert ours.decode(plain) == text and ours.eot_id not in plain  # special strings are plain text
        assert ours.decode(want) == theirs.decode(want)
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert ours.encode_batch(TEXTS, special=True) == [ours.encode(t, special=True) for t in TEXTS]


def test_save_round_trip_and_transformers_reads_our_folder(folders, tmp_path):
    _, folder, _ = folders
    ours = load_tokenizer(folder)
    ours.save(tmp_path)
    again, theirs_again = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        want = ours.encode(text, special=True)
        assert again.encode(text, special=True) == want == theirs_again.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "What is 17 * 23?"}]
    assert again.apply_chat_template(chat) == ours.apply_chat_template(chat)
    assert theirs_again.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        ours.apply_chat_template(chat, tokenize=False)
    )
    assert (again.eot_id, again.bos_id, again.pad_id, again.vocab_size) == (
        ours.eot_id, ours.bos_id, ours.pad_id, ours.vocab_size
    )  # fmt: skip


def test_special_tokens_from_every_file(tmp_path):
    save_transformers_folder("llama3", tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    cfg["bos_token"] = {"content": "<|begin_of_text|>", "__type": "AddedToken"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|end_of_text|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4], "bos_token_id": 0}))
    tok = load_tokenizer(tmp_path)
    # no eos_token in the configs: generation_config's first EOS ends answers; both stop generation
    assert tok.eot_id == 1 and tok.stop_ids == [1, 4] and tok.bos_id == 0 and tok.pad_id == 1
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                  "pad_token": "<|end_of_text|>"}  # fmt: skip
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="no EOS token in its vocabulary"):
        load_tokenizer(tmp_path)


def test_a_named_special_token_missing_from_added_tokens_becomes_one(tmp_path):
    backend = train_backend("smollm2")
    doc = json.loads(backend.to_str())
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] != "<|im_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "hi<|im_end|>"
    assert ours.encode(text, special=True) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text, special=True)[-1] == ours.eot_id


def gguf_tokenizer_meta(style, pre):
    """A GGUF vocabulary from a trained tokenizer, as llama.cpp's converter writes it."""
    backend = train_backend(style)
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = [
        " ".join(m) if isinstance(m, list) else m for m in json.loads(backend.to_str())["model"]["merges"]
    ]
    specials, bos, eos, pad, template = STYLES[style]
    types = [3 if t in specials else 1 for t in tokens]
    user = max(i for i, t in enumerate(tokens) if t.isascii() and t.isalpha() and len(t) > 2)
    types[user] = 4  # a user-defined token, like Qwen's <think>: matched whole, not special
    meta = {
        "ggml.model": "gpt2",
        "ggml.pre": pre,
        "ggml.tokens": tokens,
        "ggml.token_type": types,
        "ggml.merges": merges,
        "ggml.eos_token_id": vocab[eos],
        "ggml.add_bos_token": style == "llama3",
        "chat_template": template,
    }
    if bos:
        meta["ggml.bos_token_id"] = vocab[bos]
    if pad:
        meta["ggml.padding_token_id"] = vocab[pad]
    return meta


@pytest.mark.parametrize("style,pre", [("smollm2", "smollm"), ("llama3", "llama-bpe"), ("qwen25", "qwen2")])
def test_gguf_vocabulary_ids_equal_transformers_gguf_loading(tmp_path, style, pre):
    meta = gguf_tokenizer_meta(style, pre)
    embd = {"token_embd.weight": (np.zeros((len(meta["ggml.tokens"]), 32), np.float32), "F32")}
    write_gguf(tmp_path / "m.gguf", "llama", meta={"block_count": 1}, tensors=embd, tokenizer=meta)
    ours = load_tokenizer(tmp_path / "m.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ours.vocab_size == len(meta["ggml.tokens"])
    assert (ours.eot_id, ours.bos_id, ours.pad_id) == (
        theirs.eos_token_id,
        theirs.bos_token_id,
        theirs.pad_token_id,
    )
    assert ours.add_bos == (style == "llama3")
    texts = [*TEXTS, f"x{meta['ggml.tokens'][meta['ggml.token_type'].index(4)]}y"]
    if len(theirs) > ours.vocab_size:
        # a vocabulary without <|endoftext|> and no unk id: transformers' GPT2Tokenizer adds its default unk
        # "<|endoftext|>" as a new id past the model's embedding; we do not, so texts holding it differ
        assert style == "llama3" and theirs.convert_tokens_to_ids("<|endoftext|>") == ours.vocab_size
        texts = [t for t in texts if "<|endoftext|>" not in t]
    for text in texts:
        assert ours.encode(text, special=True) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert (
        ours.apply_chat_template(chat)
        == theirs.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    )


def test_gguf_and_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'; only byte-level BPE"):
        gguf_tokenizer({"tokenizer.ggml.model": "llama"}, source="x.gguf")
    with pytest.raises(ValueError, match="x.gguf has no tokenizer.ggml.tokens or tokenizer.ggml.merges"):
        gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, source="x.gguf")
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        HFTokenizer.from_folder(tmp_path / "nowhere")
