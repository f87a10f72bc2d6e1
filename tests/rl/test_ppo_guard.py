"""Issue 22, item 2: a PPO step that turns non-finite after some of its minibatch updates were applied is
undone as a whole (weights and AdamW state back to the step's start), and the abort says so."""

import math

import pytest
import torch
from fastrlhf.train.guard import NonFiniteError
from test_ppo import make_trainer, snapshot


def optimizer_state(opt):
    return {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())}


def same(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else same(a[k], b[k]) for k in a
    )


def test_a_step_that_blows_up_midway_is_undone_and_the_abort_says_what_happened(tmp_path):
    tr = make_trainer(f"train.out_dir={tmp_path}", "ppo.max_nonfinite=2")
    tr.step()  # one good step: AdamW has moments to restore
    weights, state, updates = snapshot(tr.trained), optimizer_state(tr.optimizer), tr.updates
    # optim.lr=1e30 from here: the first minibatch's update is finite, the weights it leaves are not usable
    tr.cfg.optim.lr = tr.cfg.optim.min_lr = 1e30
    m = tr.step()
    assert m["nonfinite_steps"] == 1 and math.isnan(m["pg_loss"]) and tr.updates == updates
    assert same(snapshot(tr.trained), weights) and same(optimizer_state(tr.optimizer), state)
    with pytest.raises(NonFiniteError) as err:
        tr.step()
    message = str(err.value)
    assert "2 non-finite PPO steps in a row" in message
    assert "its updates undone: weights and optimizer state restored to the step's start" in message
    assert f"no checkpoint was written in {tmp_path} yet" in message
    assert same(snapshot(tr.trained), weights)
