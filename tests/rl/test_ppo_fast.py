"""The rollout's shortcuts give what the plain computations give: the reward read from a trunk whose last
block runs on the tail only, and (value_model = 'policy_head') values from the sampling pass's states."""

import pytest
import torch
from fastrlhf.models import last_token_index
from fastrlhf.rl.ppo import PPOTrainer
from fastrlhf.rl.rollout import response_hidden
from test_ppo import make_trainer


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value_model", ["separate", "policy_head"])
def test_rollout_scores_and_values_equal_full_forwards(value_model):
    tr = make_trainer(f"ppo.value_model={value_model}", "ppo.max_new_tokens=24")
    if value_model == "policy_head":  # the head starts at 0; make it read the states
        torch.nn.init.normal_(tr.value.head.weight)
    prompts = tr._next_prompts()
    ro = tr.rollout(tr.generate(prompts), prompts)
    lengths = ro.mask.sum(1)  # (B,)
    assert lengths.min() < lengths.max(), f"want rows of different lengths; got {lengths.tolist()}"
    with torch.no_grad():
        index = ro.Tp + last_token_index(ro.mask)  # (B,)
        want_score = tr.reward.score(ro.sequences, index, positions=ro.positions, segment_ids=ro.segment_ids)
        h = tr.policy.hidden(ro.sequences, positions=ro.positions, segment_ids=ro.segment_ids)[
            :, ro.Tp - 1 : -1
        ]
        want_values = (
            tr.value(h)
            if value_model == "policy_head"
            else tr.value(ro.sequences, positions=ro.positions, segment_ids=ro.segment_ids)[:, ro.Tp - 1 : -1]
        )
        torch.testing.assert_close(response_hidden(tr.policy, ro), h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.score, want_score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.values, want_values * ro.mask, atol=1e-5, rtol=1e-5)


def test_reusing_the_rollouts_value_forward_changes_nothing(monkeypatch):
    """'separate': the first minibatch takes the rollout's value forward (with its graph) instead of running
    it again; the run must equal one that recomputes it (same shuffles, same updates)."""
    runs = []
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(PPOTrainer, "_rollout_values", lambda self, ro: self._values(ro))
        tr = make_trainer("ppo.value_model=separate")
        runs.append(
            ([tr.step() for _ in range(2)], {k: v.detach().clone() for k, v in tr.trained.named_parameters()})
        )
    (m_reuse, p_reuse), (m_plain, p_plain) = runs
    for a, b in zip(m_reuse, m_plain):
        for k in ("score_mean", "kl", "pg_loss", "v_loss", "approx_kl", "vf_clipfrac", "explained_variance"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for k, v in p_reuse.items():
        torch.testing.assert_close(v, p_plain[k], atol=1e-5, rtol=1e-5)
