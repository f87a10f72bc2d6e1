import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from fastrlhf.config import load_config
from fastrlhf.data.formats import FormatError, Ranking, read_rankings, read_sft
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import ScalarHeadModel
from fastrlhf.models.load import load_model
from fastrlhf.models.shared import common_prefix
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.reward import (
    RMConfig,
    as_pairs,
    encode_rankings,
    kwise_loss,
    load_reward_model,
    ranking_batch,
    rm_metrics,
    score_batch,
    train_rm,
)
from helpers.sft import arithmetic_rankings, write_ranking_file

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and a loaded 2-core machine makes two threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rm_config(sft_run, train, out, *extra):
    return load_config(
        RMConfig,
        None,
        [
            f"train.sft={sft_run}",
            f"data.train={train}",
            f"train.out_dir={out}",
            "train.device=cpu",
            "train.batch_size=8",
            "train.log_interval=1",
            "optim.lr=2e-3",
            "optim.warmup_steps=3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def rankings_file(tmp_path_factory):
    return write_ranking_file(
        tmp_path_factory.mktemp("rm") / "r.jsonl", arithmetic_rankings(80, ks=(4, 2, 3))
    )


@pytest.fixture(scope="module")
def full_run(sft_run, rankings_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_full")
    val = write_ranking_file(out / "val.jsonl", arithmetic_rankings(9, seed=7, ks=(4, 2, 3)))  # every K
    extra = ["train.max_steps=12", "train.ckpt_interval=6", "train.eval_interval=6", f"data.val={val}"]
    last = train_rm(rm_config(sft_run, rankings_file, out, *extra), quiet=True)
    return out, extra, last


def test_kwise_loss_is_the_mean_of_the_explicit_pair_losses():
    torch.manual_seed(0)
    rankings = [
        Ranking("p", ["a", "b", "c", "d"], [2, 0, 3, 1]),
        Ranking("q", ["x", "y"], [1, 0]),
        Ranking("r", ["u", "v", "w"], [0, 2, 1]),
    ]
    enc = [([[1] * (i + 2) for i in range(r.k)], r.pairs()) for r in rankings]
    idx, _last, better, worse, owner = ranking_batch(enc, 0)
    assert idx.shape[0] == 4 + 2 + 3 and len(better) == 6 + 1 + 3  # K passes, C(K, 2) pairs
    rewards = torch.randn(9, dtype=torch.float64)
    for margin in (0.0, 0.5):
        per_ranking, base = [], 0
        for r in rankings:
            pair = [
                -math.log(1 / (1 + math.exp(-(rewards[base + b] - rewards[base + w] - margin).item())))
                for b, w in r.pairs()
            ]
            per_ranking.append(sum(pair) / len(pair))
            base += r.k
        want = sum(per_ranking) / len(per_ranking)
        assert kwise_loss(rewards, better, worse, owner, margin).item() == pytest.approx(want, rel=1e-12)
    # the same rankings as independent pairs: 2 * C(K, 2) sequences, each pair its own batch element
    pairs = as_pairs(enc)
    assert len(pairs) == 10 and sum(len(s) for s, _ in pairs) == 20
    flat = torch.stack([rewards[better], rewards[worse]], 1).flatten()  # (2P,) the pair rewards in order
    _, _, pb, pw, po = ranking_batch(pairs, 0)
    pair_mean = -F.logsigmoid(rewards[better] - rewards[worse]).mean()
    torch.testing.assert_close(kwise_loss(flat, pb, pw, po), pair_mean)


def test_loss_falls_every_parameter_changes_and_metrics(full_run, sft_run):
    out, _, _last = full_run
    log = read_jsonl(out / "log.jsonl")
    assert (
        log[0]["step"] == 0
        and log[0]["dropped"] == 0
        and (log[0]["train_rankings"], log[0]["val_rankings"]) == (80, 9)
    )
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    evals = [r for r in log if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert {"val_loss", "val_margin", "val_acc_k2", "val_acc_k3", "val_acc_k4"} <= set(evals[-1])
    rm, _ = load_reward_model(out)
    gpt, _ = load_model(sft_run)
    init = {f"trunk.{k}": v for k, v in gpt.weights().items()}
    for name, w in rm.weights().items():
        if name in init:
            assert not torch.equal(w, init[name]), f"{name} did not change"
    assert set(rm.weights()) - set(init) == {"head.weight", "head.bias"}


def test_metrics_match_a_direct_computation(full_run, rankings_file, sft_run):
    out, _, _last = full_run
    rm, tok = load_reward_model(out)
    enc, _, _ = encode_rankings(tok, arithmetic_rankings(12, seed=5, ks=(4, 2)), 32, "drop")
    m = rm_metrics(rm, enc, tok.eot_id, CPU, batch_size=5)
    with torch.no_grad():
        rewards, better, worse, owner = score_batch(rm, enc, tok.eot_id, CPU)
    diff = rewards[better] - rewards[worse]
    assert m["val_accuracy"] == pytest.approx((diff > 0).float().mean().item())
    assert m["val_margin"] == pytest.approx(diff.mean().item(), abs=1e-5)
    k = torch.tensor([len(enc[j][0]) for j in owner.tolist()])
    assert m["val_acc_k2"] == pytest.approx((diff[k == 2] > 0).float().mean().item())


def test_bias_makes_the_sft_demonstrations_score_zero(full_run, sft_run):
    out, _, _ = full_run
    rm, tok = load_reward_model(out)
    demos = read_sft(sft_run.parent / "demos.jsonl")[:512]
    enc = [
        ([s], [])
        for s in (
            encode_rankings(tok, [Ranking(d.prompt, [d.response, "x"], [0, 1])], 32, "drop")[0][0][0][0]
            for d in demos
        )
    ]
    idx, last, *_ = ranking_batch(enc, tok.eot_id)
    with torch.no_grad():
        assert rm.score(idx, last).mean().item() == pytest.approx(0.0, abs=1e-4)
    shifts = [
        r["demo_reward_before_shift"]
        for r in read_jsonl(out / "log.jsonl")
        if "demo_reward_before_shift" in r
    ]
    assert len(shifts) == 2 and abs(shifts[0]) > 1e-3  # the untrained head does not score them 0 by itself


def test_resume_gives_identical_numbers(full_run, sft_run, rankings_file, tmp_path):
    out, extra, _ = full_run
    shutil.copytree(out / "step_0000006", tmp_path / "step_0000006")
    (tmp_path / "latest").write_text("step_0000006\n")
    train_rm(rm_config(sft_run, rankings_file, tmp_path, *extra), quiet=True)
    key = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
    want = [key(r) for r in read_jsonl(out / "log.jsonl") if r["step"] > 6]
    assert [key(r) for r in read_jsonl(tmp_path / "log.jsonl")] == want
    a, b = load_reward_model(out)[0].weights(), load_reward_model(tmp_path)[0].weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairwise_mode_trains_on_flattened_pairs(sft_run, rankings_file, tmp_path):
    last = train_rm(
        rm_config(
            sft_run, rankings_file, tmp_path, "train.max_steps=2", "train.pairwise=true", "data.demos=none"
        ),
        quiet=True,
    )
    assert math.isfinite(last["loss"]) and 0.0 <= last["val_accuracy"] <= 1.0


def test_center_coef_pulls_every_reward_towards_zero(sft_run, rankings_file, tmp_path):
    """train.center_coef adds coef * mean(r^2) to the ranking loss: the same run with it ends with rewards
    much nearer 0 (the ranking loss alone leaves each prompt's offset free)."""
    mean_sq = []
    for coef, out in ((0.0, tmp_path / "a"), (1.0, tmp_path / "b")):
        train_rm(
            rm_config(
                sft_run,
                rankings_file,
                out,
                "train.max_steps=8",
                "data.demos=none",
                f"train.center_coef={coef}",
            ),
            quiet=True,
        )
        rm, tok = load_reward_model(out)
        enc = encode_rankings(tok, read_rankings(rankings_file), rm.config.block_size, "drop")[0]
        with torch.no_grad():
            rewards = score_batch(rm, enc, tok.eot_id, CPU)[0]  # (N,)
        mean_sq.append(rewards.square().mean().item())
    assert mean_sq[1] < 0.5 * mean_sq[0], mean_sq


def test_negative_center_coef(sft_run, rankings_file, tmp_path):
    with pytest.raises(ValueError, match=r"train.center_coef must be >= 0; got -0.1"):
        rm_config(sft_run, rankings_file, tmp_path, "train.center_coef=-0.1")


def test_ranking_that_is_not_a_permutation(sft_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "What is 1+1?", "responses": ["2", "3"], "ranking": [0, 1]}\n'
        '{"prompt": "What is 1+2?", "responses": ["3", "4", "5"], "ranking": [0, 0, 2]}\n'
    )
    with pytest.raises(FormatError, match=r"bad.jsonl:2: ranking must be a permutation of range\(3\)"):
        train_rm(rm_config(sft_run, bad, tmp_path / "o"), quiet=True)


def test_k_below_two(sft_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "responses": ["2"], "ranking": [0]}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:1: a ranking needs K >= 2 responses; got K = 1"):
        train_rm(rm_config(sft_run, bad, tmp_path / "o"), quiet=True)


def test_empty_response(sft_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "chosen": "2", "rejected": " "}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:1: rejected is empty"):
        train_rm(rm_config(sft_run, bad, tmp_path / "o"), quiet=True)


def test_malformed_line(sft_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}\n{"prompt": "x", \n')
    with pytest.raises(FormatError, match=r"bad.jsonl:2: malformed JSON"):
        train_rm(rm_config(sft_run, bad, tmp_path / "o"), quiet=True)


def test_overlong_rankings_dropped_or_truncated(sft_run):
    _, tok = load_model(sft_run)
    rankings = [
        Ranking("What is 1+1?", ["2", "3 " * 40], [0, 1]),
        Ranking("What is 1+2?", ["3", "4"], [0, 1]),
        Ranking("long " * 40, ["a", "b"], [0, 1]),
    ]
    enc, dropped, truncated = encode_rankings(tok, rankings, 32, "drop")
    assert (len(enc), dropped, truncated) == (1, 2, 0)
    enc, dropped, truncated = encode_rankings(tok, rankings, 32, "truncate")
    assert (len(enc), dropped, truncated) == (2, 1, 1) and max(len(s) for s in enc[0][0]) == 32


def test_tied_pairs_train_nothing_and_all_tied_rankings_are_counted(sft_run, tmp_path):
    rows = [
        Ranking(f"What is {i}+1?", [str(i + 1), "x", "y"], [0, 1, 2], [1.0, -1.0, -1.0]) for i in range(12)
    ]
    rows += [Ranking("What is 5+5?", ["1", "2"], [0, 1], [-1.0, -1.0])]  # all tied
    path = write_ranking_file(tmp_path / "r.jsonl", rows)
    last = train_rm(
        rm_config(
            sft_run, path, tmp_path / "o", "train.max_steps=2", "data.demos=none", "data.val_fraction=0.25"
        ),
        quiet=True,
    )
    head = read_jsonl(tmp_path / "o" / "log.jsonl")[0]
    assert head["all_tied"] + head["val_all_tied"] == 1
    assert head["train_pairs"] == 2 * head["train_rankings"] and head["val_pairs"] == 2 * head["val_rankings"]
    assert math.isfinite(last["loss"]) and math.isfinite(last["val_loss"])


def test_shared_prefix_forward_leaves_the_loss_curve_unchanged(full_run, sft_run, rankings_file, tmp_path):
    """train.share_prefix=false (one plain forward per response) reproduces the default run's log within
    fp32 noise: same losses, gradient norms and held-out metrics step by step. (Not the demonstrations'
    mean reward: the head's bias has gradient 0 in exact arithmetic, so AdamW turns its fp32 rounding
    noise into steps of ~lr, and the bias wanders by ~lr * steps differently in any two runs.)"""
    out, extra, _ = full_run
    train_rm(rm_config(sft_run, rankings_file, tmp_path, *extra, "train.share_prefix=false"), quiet=True)
    keys = ("loss", "grad_norm", "val_loss", "val_accuracy", "val_margin")
    rows = [[{k: r[k] for k in keys if k in r} for r in read_jsonl(p / "log.jsonl")] for p in (out, tmp_path)]
    assert [r.keys() for r in rows[0]] == [r.keys() for r in rows[1]]
    assert sum("loss" in r for r in rows[0]) == 12 and sum("val_loss" in r for r in rows[0]) == 2
    assert rows[0] != rows[1]  # two code paths really ran (their rounding differs)
    for a, b in zip(*rows):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a, b, k)


def test_score_batch_shared_equals_plain_with_gradients(sft_run, rankings_file):
    """Real tokenised rankings (K = 2, 3, 4; prompts of different lengths): the shared-prefix rewards and
    every parameter's gradient equal the plain forward's (float64)."""
    gpt, tok = load_model(ckpt.resolve_checkpoint(sft_run))
    rm = ScalarHeadModel.from_gpt(gpt).double()
    # one-digit prompts may all tokenise to one length: two-digit ones make the shared prefixes differ
    longer = [
        Ranking("What is 12+30?", ["42", "43", "52"], [0, 1, 2]),
        Ranking("What is 45+45?", ["90", "80"], [0, 1]),
    ]
    enc = encode_rankings(tok, read_rankings(rankings_file)[:7] + longer, gpt.config.block_size, "drop")[0]
    assert {len(s) for s, _ in enc} == {2, 3, 4} and len({common_prefix(s) for s, _ in enc}) > 1
    out = []
    for share in (True, False):
        rm.zero_grad(set_to_none=True)
        rewards, better, worse, owner = score_batch(rm, enc, tok.eot_id, CPU, share)
        kwise_loss(rewards, better, worse, owner).backward()
        out.append((rewards.detach(), [p.grad.clone() for p in rm.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lora_reward_model_trains_adapters_and_head_only_resumes_and_loads_merged(
    sft_run, rankings_file, tmp_path
):
    """[lora] r > 0: the trunk's base weights stay the SFT model's, the adapters and the scalar head learn; a
    resume rebuilds the adapters and gives the same numbers; load_reward_model merges them (equal scores) or,
    with merge=False, keeps them on the frozen trunk."""
    from fastrlhf.models.load import load_scalar_model
    from fastrlhf.models.lora import lora_layers

    extra = [
        "train.max_steps=4",
        "train.ckpt_interval=2",
        "train.eval_interval=2",
        "lora.r=4",
        "optim.lr=1e-2",
    ]
    extra.append("lora.targets=c_attn,c_proj,c_fc")  # GPT-2's linears
    out = tmp_path / "a"
    train_rm(rm_config(sft_run, rankings_file, out, *extra), quiet=True)
    sft = load_model(sft_run)[0].weights()
    rm, _ = load_scalar_model(out, merge=False)
    assert lora_layers(rm.trunk) and rm.trunk.lora_config.r == 4
    base = {k: v for k, v in rm.trunk.weights().items() if "lora_" not in k}
    assert all(torch.equal(base[k], sft[k]) for k in sft)  # the frozen trunk is the SFT model's
    assert any(v.abs().sum() > 0 for k, v in rm.trunk.weights().items() if "lora_B" in k)  # B starts at 0
    merged = load_reward_model(out)[0]
    assert not lora_layers(merged.trunk)
    idx = torch.randint(0, merged.config.vocab_size, (2, 9))
    torch.testing.assert_close(merged(idx), rm(idx), rtol=1e-4, atol=1e-5)
    # resume from the middle: the same log
    shutil.copytree(out / "step_0000002", tmp_path / "b" / "step_0000002")
    (tmp_path / "b" / "latest").write_text("step_0000002\n")
    train_rm(rm_config(sft_run, rankings_file, tmp_path / "b", *extra), quiet=True)
    key = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
    want = [key(r) for r in read_jsonl(out / "log.jsonl") if r["step"] > 2]
    assert [key(r) for r in read_jsonl(tmp_path / "b" / "log.jsonl")] == want
    # a full-fine-tuning run refuses to resume a LoRA one
    with pytest.raises(ValueError, match="was trained with model"):
        train_rm(rm_config(sft_run, rankings_file, out, "train.max_steps=6"), quiet=True)
