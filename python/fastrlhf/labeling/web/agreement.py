"""Inter-labeler agreement: on the prompts two labelers both ranked, the fraction of answer pairs they
order the same way (InstructGPT, arXiv 2203.02155, section 5.1: 72.6 +- 1.5 % between its training
labelers). Read from a folder of per-labeler files (labels.py) by `python -m fastrlhf label-agreement DIR`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

from fastrlhf.labeling.web.labels import Label

__all__ = ["Agreement", "agreement", "format_agreement"]


@dataclass
class Agreement:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """labeler -> {"ranked", "skipped", "flagged"}"""
    pairs: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    """(labeler a, labeler b), a < b -> (shared prompts, answer pairs ordered alike, answer pairs compared)"""

    def labeler_agreement(self, name: str) -> tuple[int, int]:
        """(pairs ordered alike, pairs compared) between `name` and everyone else."""
        same = total = 0
        for (a, b), (_, s, t) in self.pairs.items():
            if name in (a, b):
                same, total = same + s, total + t
        return same, total

    def overall(self) -> tuple[int, int]:
        return sum(s for _, s, _ in self.pairs.values()), sum(t for _, _, t in self.pairs.values())


def _same_order(r1: Sequence[int], r2: Sequence[int]) -> tuple[int, int]:
    """(answer pairs two rankings of the same K answers order alike, C(K, 2))."""
    pos1 = {a: i for i, a in enumerate(r1)}
    pos2 = {a: i for i, a in enumerate(r2)}
    pairs = list(combinations(range(len(r1)), 2))
    return sum((pos1[i] < pos1[j]) == (pos2[i] < pos2[j]) for i, j in pairs), len(pairs)


def agreement(labels: Mapping[str, Sequence[Label]]) -> Agreement:
    """Counts per labeler and agreement per pair of labelers. Two rankings are compared when they share
    the prompt id and the very same answers (a prompt resampled between them is not the same question)."""
    out = Agreement()
    ranked: dict[str, dict[tuple[str, tuple[str, ...]], tuple[int, ...]]] = {}
    for name, xs in sorted(labels.items()):
        ranked[name] = {(x.prompt_id, x.responses): x.ranking for x in xs if x.ranking is not None}
        out.counts[name] = {
            "ranked": len(ranked[name]),
            "skipped": sum(x.ranking is None for x in xs),
            "flagged": sum(bool(x.flags) for x in xs),
        }
    for a, b in combinations(sorted(ranked), 2):
        shared = ranked[a].keys() & ranked[b].keys()
        same = total = 0
        for key in shared:
            s, t = _same_order(ranked[a][key], ranked[b][key])
            same, total = same + s, total + t
        out.pairs[(a, b)] = (len(shared), same, total)
    return out


def _frac(same: int, total: int) -> str:
    return f"{same / total:.3f}" if total else "-"


def format_agreement(ag: Agreement) -> str:
    """A plain-text report: per labeler counts and agreement with the others, then every pair."""
    w = max([len(n) for n in ag.counts] + [7])
    lines = [f"{'labeler':<{w}}  ranked  skipped  flagged  agreement with the others (answer pairs)"]
    for name, c in ag.counts.items():
        same, total = ag.labeler_agreement(name)
        lines.append(
            f"{name:<{w}}  {c['ranked']:>6}  {c['skipped']:>7}  {c['flagged']:>7}  {_frac(same, total)} ({total})"
        )
    if ag.pairs:
        lines += ["", f"{'pair':<{2 * w + 3}}  shared prompts  agreement (answer pairs)"]
        for (a, b), (shared, same, total) in ag.pairs.items():
            lines.append(f"{a + ' - ' + b:<{2 * w + 3}}  {shared:>14}  {_frac(same, total)} ({total})")
    same, total = ag.overall()
    lines += [
        "",
        f"all pairs of labelers: {_frac(same, total)} of {total} answer pairs ordered alike"
        + " (InstructGPT's labelers: 0.726 +- 0.015)",
    ]
    return "\n".join(lines)
