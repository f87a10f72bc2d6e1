"""Where an arithmetic reward model goes wrong: held-out pairwise accuracy per kind of pair, next to the
SFT model's own log-probability of each response used as a score.

    .venv/bin/python scripts/rm_pair_kinds.py runs/arithmetic [--rm runs/arithmetic/rm] [--rankings 300]

Kinds come from the arithmetic labeler's scores (1 right, -1 unparsable, -|d| / (|d| + 1) for a number
off by d): right vs unparsable, right vs off by one, right vs further off, and pairs of two wrong answers.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from fastrlhf.data import encode_chat
from fastrlhf.data.formats import read_rankings
from fastrlhf.models.load import load_model
from fastrlhf.train.reward import load_reward_model


def kind(better: float, worse: float) -> str:
    if worse == -1.0:
        return "right/unparsable" if better == 1.0 else "wrong/unparsable"
    if better < 1.0:
        return "wrong/wrong"
    return "right/off-by-one" if worse >= -0.5 else "right/further"


@torch.no_grad()
def scores(gpt, rm, tok, prompt: str, responses: list[str]) -> tuple[list[float], list[float]]:
    """(SFT log-prob of each response + EOT, RM reward of each response)."""
    logprob, reward = [], []
    for r in responses:
        ids, mask = encode_chat(tok, prompt, r)
        x = torch.tensor(ids)[None]  # (1, T)
        logits = gpt(x[:, :-1])[0][0]  # (T - 1, V)
        lp = F.log_softmax(logits.float(), -1).gather(1, x[0, 1:, None])[:, 0]  # (T - 1,)
        logprob.append(float(lp[torch.tensor(mask[1:])].sum()))
        reward.append(float(rm.score(x, torch.tensor([len(ids) - 1]))[0]))
    return logprob, reward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a pipeline run folder (its sft/ and label/heldout.jsonl are read)")
    p.add_argument("--rm", help="reward model checkpoint or run folder (default: RUN/rm)")
    p.add_argument(
        "--rankings", type=int, default=300, help="held-out rankings to score (default: %(default)s)"
    )
    p.add_argument("--file", help="rankings JSONL (default: RUN/label/heldout.jsonl)")
    a = p.parse_args()
    torch.set_num_threads(1)
    gpt, tok = load_model(f"{a.run}/sft")
    gpt.eval()
    rm, _ = load_reward_model(a.rm or f"{a.run}/rm")
    counts: dict[str, list[int]] = {}  # kind -> [pairs, SFT log-prob right, RM right]
    for r in [r for r in read_rankings(a.file or f"{a.run}/label/heldout.jsonl") if r.pairs()][: a.rankings]:
        logprob, reward = scores(gpt, rm, tok, r.prompt, list(r.responses))
        for b, w in r.pairs():
            c = counts.setdefault(kind(r.scores[b], r.scores[w]), [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + (logprob[b] > logprob[w]), c[2] + (reward[b] > reward[w])
    counts["all"] = [sum(c[i] for c in counts.values()) for i in range(3)]
    print(f"{'pair kind':18s} {'pairs':>6s} {'share':>6s} {'RM':>6s} {'SFT logprob':>12s}")
    for k, (n, lp, rm_right) in counts.items():
        print(f"{k:18s} {n:6d} {n / counts['all'][0]:6.1%} {rm_right / n:6.3f} {lp / n:12.3f}")


if __name__ == "__main__":
    main()
