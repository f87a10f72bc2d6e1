"""The arithmetic task: seeded synthetic problems ("What is 37+45?" -> "82"), exactly checkable.

The problem space (every operator x every pair of operands with the allowed digit counts) is numbered
0..N-1 and permuted by a fixed pseudo-random bijection (a Feistel network with cycle walking); every
HELDOUT_EVERY-th position of that permutation is held out. (An affine map p -> p * m + c mod N is no good
here: it keeps p mod gcd(10, N) as a fixed residue of the index, so a held-out set of every tenth position
shared the second operand's last digit, a slice of problems that training never saw.) The split depends
on the space alone, never on a seed, so train and held-out never overlap whatever seeds draw from them, and
sampling without replacement is O(n) even when N is in the millions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from fastrlhf.config import check_range
from fastrlhf.data.chat import format_prompt
from fastrlhf.data.formats import SFTExample
from fastrlhf.tasks.base import Goal

__all__ = [
    "HELDOUT_EVERY",
    "OPS",
    "ArithmeticTask",
    "Problem",
    "make_problems",
    "parse_answer",
    "parse_problem",
    "split_size",
]

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
HELDOUT_EVERY = 10
_ROUND_KEYS = (0x9E3779B9, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35)  # fixed: the split must never change
_PROBLEM = re.compile(r"What is (\d+)([+\-*])(\d+)\?")
_ANSWER = re.compile(r"[-+]?\d{1,64}")  # 64 digits bounds int() work on junk


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def value(self) -> int:
        return OPS[self.op](self.a, self.b)

    @property
    def prompt(self) -> str:
        return f"What is {self.a}{self.op}{self.b}?"

    @property
    def answer(self) -> str:
        return str(self.value)


def parse_problem(prompt: str) -> Problem:
    """The problem a prompt states; ValueError naming the prompt when it is not one of ours."""
    m = _PROBLEM.fullmatch(prompt.strip())
    if not m:
        raise ValueError(f"not an arithmetic prompt (expected e.g. 'What is 37+45?'); got {prompt!r}")
    return Problem(int(m.group(1)), m.group(2), int(m.group(3)))


def parse_answer(response: str) -> int | None:
    """The integer a response gives as its first line, or None when that line is not just an integer
    ("82", " -4 ", "82\\nWhat is..." parse; "eighty-two", "82 apples", "" do not)."""
    lines = response.strip().splitlines()
    m = _ANSWER.fullmatch(lines[0].strip()) if lines else None
    return int(m.group()) if m else None


def _check(ops: tuple[str, ...], digits: tuple[int, ...]) -> None:
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops must be distinct operators from {sorted(OPS)}; got {ops!r}")
    bad_digit = any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 6 for d in digits)
    if not digits or bad_digit or len(set(digits)) != len(digits):
        raise ValueError(f"digits must be distinct digit counts in 1..6; got {digits!r}")


class _Space:
    """Problems numbered 0..N-1: index = (op * M + a_index) * M + b_index over M operand values."""

    def __init__(self, ops: tuple[str, ...], digits: tuple[int, ...]) -> None:
        _check(ops, digits)
        self.ops = ops
        # operand ranges: 1 digit is 0..9, d digits is 10^(d-1)..10^d - 1
        self.ranges = [range(0 if d == 1 else 10 ** (d - 1), 10**d) for d in sorted(digits)]
        self.m = sum(len(r) for r in self.ranges)
        self.n = len(ops) * self.m * self.m
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)  # Feistel halves: 4^half >= N, < 4N
        self.n_heldout = -(-self.n // HELDOUT_EVERY)  # positions 0, 10, 20, ... < n

    def operand(self, i: int) -> int:
        for r in self.ranges:
            if i < len(r):
                return r[i]
            i -= len(r)
        raise IndexError(i)

    def _feistel(self, x: int) -> int:
        """A bijection of 0..4^half - 1 (each round swaps the halves and mixes one into the other)."""
        mask = (1 << self.half) - 1
        left, right = x >> self.half, x & mask
        for key in _ROUND_KEYS:
            f = ((right + key) * 0x2C1B3C6D) & 0xFFFFFFFF  # 32-bit multiply-xorshift round function
            f ^= f >> 15
            left, right = right, left ^ (f & mask)
        return (left << self.half) | right

    def index(self, position: int) -> int:
        """The problem index at a position: the Feistel bijection, re-applied until it lands below N
        (cycle walking keeps it a bijection of 0..N-1; 4^half < 4N, so a few rounds on average)."""
        x = self._feistel(position)
        while x >= self.n:
            x = self._feistel(x)
        return x

    def problem(self, position: int) -> Problem:
        index = self.index(position)
        op, rest = divmod(index, self.m * self.m)
        return Problem(self.operand(rest // self.m), self.ops[op], self.operand(rest % self.m))

    def position(self, split: str, j: int) -> int:
        """The j-th position of a split: held-out takes multiples of HELDOUT_EVERY, train the rest."""
        if split == "heldout":
            return j * HELDOUT_EVERY
        q, r = divmod(j, HELDOUT_EVERY - 1)
        return q * HELDOUT_EVERY + r + 1

    def size(self, split: str) -> int:
        return self.n_heldout if split == "heldout" else self.n - self.n_heldout


def make_problems(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    ops: tuple[str, ...] = ("+", "-", "*"),
    digits: tuple[int, ...] = (1, 2),
) -> list[Problem]:
    """n distinct problems of one split ("train" or "heldout"), the same for the same arguments."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}")
    space = _Space(tuple(ops), tuple(digits))
    size = space.size(split)
    if not 0 <= n <= size:
        raise ValueError(f"n must be in 0..{size} (the {split} split of ops={ops}, digits={digits}); got {n}")
    rng = random.Random(f"arithmetic/{seed}/{split}")  # str seeds hash the same in every process
    return [space.problem(space.position(split, j)) for j in rng.sample(range(size), n)]


def split_size(split: str, ops: tuple[str, ...] = ("+", "-", "*"), digits: tuple[int, ...] = (1, 2)) -> int:
    """How many distinct problems a split ("train" or "heldout") has."""
    return _Space(tuple(ops), tuple(digits)).size(split)


@dataclass
class ArithmeticTask:
    """Train prompts + demonstrations and held-out prompts, the pretraining documents; ranked by
    `preference`, scored by `score`."""

    n_train: int = 2000
    """number of train problems (prompts and SFT demonstrations)"""
    n_heldout: int = 200
    """number of held-out problems (evaluation prompts)"""
    seed: int = 0
    """which problems are drawn (the split itself does not depend on it)"""
    ops: tuple[str, ...] = ("+", "-", "*")
    """operators used"""
    digits: tuple[int, ...] = (1, 2)
    """allowed digit counts of each operand"""

    n_pretrain: int = 20000
    """number of train problems written out with their answers as the pretraining corpus"""

    name = "arithmetic"

    def problems(self, split: str) -> list[Problem]:
        n = self.n_heldout if split == "heldout" else self.n_train
        return make_problems(n, seed=self.seed, split=split, ops=self.ops, digits=self.digits)

    def prompts(self, split: str) -> list[str]:
        return [p.prompt for p in self.problems(split)]

    def demonstrations(self) -> list[SFTExample]:
        return [SFTExample(p.prompt, p.answer) for p in self.problems("train")]

    def pretrain_documents(self) -> list[str]:
        """Train problems with their answers in the chat format, one per document (no held-out one)."""
        n = min(self.n_pretrain, split_size("train", self.ops, self.digits))
        return [
            f"{format_prompt(p.prompt)} {p.answer}"
            for p in make_problems(n, seed=1, ops=self.ops, digits=self.digits)
        ]


# ---- what the pipeline and the labelers read (tasks/registry.py) --------------------------------------
NAME = "arithmetic"
GOAL = Goal(metric="accuracy", min_gain=1e-9, rm_accuracy=0.9)


@dataclass
class Options:
    """The pipeline's [arithmetic] table: the problem space."""

    ops: str = "+"
    """Operators, any of '+', '-', '*' (two-digit '-' and '*' need far more training than 2 cores give)."""
    max_digits: int = 2
    """Operands have 1..max_digits digits."""
    train_problems: int = 9000
    """Train problems (at most the train split's size): SFT demonstrations, and the prompts labeling and PPO draw from."""
    heldout_problems: int = 512
    """Held-out problems: the prompts the reward model is tested on and the evaluation answers."""
    pretrain_problems: int = 20000
    """Train problems written out with their answers as the pretraining corpus."""

    LABEL_FIELDS = ("heldout_problems",)  # first read by the label stage: changing them redoes it onward

    def __post_init__(self) -> None:
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"arithmetic.ops must be distinct operators from '+-*'; got {self.ops!r}")
        check_range("arithmetic.max_digits", self.max_digits, 1, 6)
        for name in ("train_problems", "pretrain_problems", "heldout_problems"):
            check_range(f"arithmetic.{name}", getattr(self, name), 1, float("inf"))
        digits = tuple(range(1, self.max_digits + 1))
        for split, name in (("train", "train_problems"), ("heldout", "heldout_problems")):
            check_range(
                f"arithmetic.{name}", getattr(self, name), 1, split_size(split, tuple(self.ops), digits)
            )


def build(options: Options, corpus: str = "") -> ArithmeticTask:
    """The task the pipeline runs (the corpus is unused: the problems are the text)."""
    return ArithmeticTask(
        n_train=options.train_problems,
        n_heldout=options.heldout_problems,
        ops=tuple(options.ops),
        digits=tuple(range(1, options.max_digits + 1)),
        n_pretrain=options.pretrain_problems,
    )


def score(prompt: str, response: str) -> float:
    """The true score: 1 for the right answer, 0 otherwise."""
    return float(parse_answer(response) == parse_problem(prompt).value)


def preference(prompt: str, response: str) -> float:
    """The scripted labeler's graded score: 1 for the right answer, -1 for no number, and
    -1 + 1 / (1 + distance) in (-1, 0) for a wrong one (near misses rank above far ones)."""
    x, target = parse_answer(response), parse_problem(prompt).value
    if x is None:
        return -1.0
    return 1.0 if x == target else -1.0 + 1.0 / (1.0 + abs(x - target))
