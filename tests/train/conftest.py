import pytest

from fastrlhf.data import corpus
from pretrain_helpers import make_text


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    docs = [make_text(300, s) for s in range(4)]
    corpus.prepare(docs, corpus.build_tokenizer("bpe", docs, 300), out, val_fraction=0.1)
    return out
