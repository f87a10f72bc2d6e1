"""Shared by the SFT / reward / label tests: a tiny SFT config and arithmetic data made on the spot."""

import random

from fastrlhf.config import load_config
from fastrlhf.data.formats import Ranking, SFTExample, write_rankings, write_sft
from fastrlhf.labeling.labelers import make_labeler
from fastrlhf.tasks.arithmetic import make_problems

TINY_SFT = [
    "model.vocab_size=300",
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=5",
    "train.batch_size=4",
    "train.log_interval=1",
    "train.device=cpu",
]


def write_demos(path, n=240, seed=0):
    write_sft(path, [SFTExample(p.prompt, p.answer) for p in make_problems(n, seed=seed, digits=(1,))])
    return path


def arithmetic_rankings(n, seed=0, ks=(4,)):
    """n rankings of made-up answers (right, off by 1, 3, 10, 30), ranked by the arithmetic labeler."""
    rng, lab, out = random.Random(seed), make_labeler("arithmetic"), []
    for i, p in enumerate(make_problems(n, seed=seed, digits=(1,))):
        k = ks[i % len(ks)]
        answers = [str(p.value + d) for d in rng.sample([0, 1, -3, 10, -30], k)]
        out.append(Ranking(p.prompt, answers, lab.rank(p.prompt, answers)))
    return out


def sft_config(*extra):
    from fastrlhf.train.sft import SFTConfig

    return load_config(SFTConfig, None, TINY_SFT + list(extra))


def write_ranking_file(path, rankings):
    write_rankings(path, rankings)
    return path
