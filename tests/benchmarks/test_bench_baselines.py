"""The TRL baselines' validation that needs no TRL: bench_reward_trl.py's model pair scores alike, and our
K-wise loss at K = 2 is RewardTrainer's pairwise loss. (The timings and TRL's own calls need trl, which CI
does not install; the benchmark itself re-checks all of this against TRL before timing.)"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_reward_trl import hf_rewards, make_models, make_pairs, our_rewards
from fastrlhf.train.reward import kwise_loss, score_batch


def test_reward_models_agree_and_losses_match():
    pairs = make_pairs(3, 19, 97)  # odd length and vocab
    ours, hf = make_models(97, 19, jitter=0.05)
    with torch.no_grad():
        r_ours, r_hf = our_rewards(ours, pairs), hf_rewards(hf, pairs)  # (6,) each: chosen, then rejected
        torch.testing.assert_close(r_ours, r_hf, rtol=1e-4, atol=1e-5)
        assert r_ours.std() > 1e-3  # the rewards differ between sequences: the comparison means something
        trl_loss = -F.logsigmoid(r_hf[:3] - r_hf[3:]).mean()  # RewardTrainer.compute_loss without a margin
        batch = [([c, w], [(0, 1)]) for c, w in pairs]
        ours_loss = kwise_loss(*score_batch(ours, batch, 0, torch.device("cpu")))
    torch.testing.assert_close(ours_loss, trl_loss, rtol=1e-5, atol=1e-6)


def test_pairs_avoid_pad_and_eos_and_share_the_prompt():
    pairs = make_pairs(4, 10, 7)
    for c, r in pairs:
        assert len(c) == len(r) == 10 and c[:5] == r[:5]
        assert min(c + r) >= 1 and max(c + r) <= 5  # HF scores the last non-pad token; 0 is the pad id
