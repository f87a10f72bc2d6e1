import random

import pytest

from fastrlhf.data import corpus


def make_text(n_lines: int, seed: int) -> str:
    """Project-made text with structure a tiny model can learn within a few dozen steps."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "LEAR", "FOOL", "HAMLET"]
    verbs = ["loves", "fears", "mocks", "follows", "greets"]
    return "".join(f"{rng.choice(names)}. The {rng.choice(['king', 'queen', 'night'])} {rng.choice(verbs)} "
                   f"the {rng.choice(['moon', 'crown', 'sea'])}.\n" for _ in range(n_lines))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    docs = [make_text(300, s) for s in range(4)]
    corpus.prepare(docs, corpus.build_tokenizer("bpe", docs, 300), out, val_fraction=0.1)
    return out


TINY = ["model.vocab_size=300", "model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=5", "train.batch_size=8",
        "train.eval_batches=2", "train.log_interval=1", "train.threads=1"]
