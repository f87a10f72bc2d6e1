"""Shared by the trainer tests: project-made text and a tiny model config."""

import random


def make_text(n_lines: int, seed: int) -> str:
    """Project-made text with structure a tiny model can learn within a few dozen steps."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "LEAR", "FOOL", "HAMLET"]
    verbs = ["loves", "fears", "mocks", "follows", "greets"]
    return "".join(
        f"{rng.choice(names)}. The {rng.choice(['king', 'queen', 'night'])} {rng.choice(verbs)} "
        f"the {rng.choice(['moon', 'crown', 'sea'])}.\n"
        for _ in range(n_lines)
    )


TINY = [
    "model.vocab_size=300",
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=5",
    "train.batch_size=8",
    "train.eval_batches=2",
    "train.log_interval=1",
]
