"""train.dpo: the loss equals the plain pairwise computation (float64, one forward per answer per pair), a
run learns and changes every weight, resume (from a copied checkpoint, and after kill -9) repeats the
uninterrupted run bit for bit, the reference is cached in the run folder, and bad input is named."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from fastrlhf.config import load_config
from fastrlhf.data.formats import FormatError, Ranking, numbered_rankings
from fastrlhf.data.hf_tokenizer import HFTokenizer
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM
from fastrlhf.models.load import from_pretrained, load_model
from fastrlhf.train import dist
from fastrlhf.train import dpo as dpo_module
from fastrlhf.train.dpo import REFERENCE_FILE, DPOConfig, dpo, encode_rankings
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.preference import preference_loss, ranking_batch, sequence_logprobs
from helpers.sft import arithmetic_rankings, write_ranking_file

STEPS = ["train.max_steps=8", "train.ckpt_interval=4", "train.eval_interval=4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and a loaded 2-core machine makes two threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def args(policy, train, out, *extra):
    return [
        f"policy={policy}",
        f"data.train={train}",
        f"train.out_dir={out}",
        "train.device=cpu",
        "train.threads=1",
        "train.batch_size=6",
        "train.log_interval=1",
        "optim.lr=2e-3",
        "optim.warmup_steps=2",
        "dpo.beta=0.5",
        *extra,
    ]


def dpo_config(*a):
    return load_config(DPOConfig, None, args(*a))


@pytest.fixture(scope="module")
def rankings(tmp_path_factory):
    return write_ranking_file(
        tmp_path_factory.mktemp("dpo") / "r.jsonl", arithmetic_rankings(60, ks=(4, 2, 3))
    )


@pytest.fixture(scope="module")
def full_run(sft_run, rankings, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_full")
    last = dpo(dpo_config(sft_run, rankings, out, *STEPS), quiet=True)
    return out, last


def plain_logp(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log pi(answer | prompt) from one full forward over prompt + answer."""
    seq = torch.tensor([prompt + answer])
    logits = model(seq)[0][0, :-1]  # (T - 1, V)
    return torch.log_softmax(logits, -1).gather(1, seq[0, 1:, None])[-len(answer) :].sum()


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_equals_the_plain_pairwise_computation(sft_run, loss):
    """Our K forwards per ranking give the loss of 2 C(K, 2) separate policy and reference forwards."""
    policy, tok = load_model(sft_run)
    policy = policy.double()
    ref = load_model(sft_run)[0].double()
    with torch.no_grad():  # the policy drifts from the reference, so the log-ratios are not 0
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = list(enumerate(arithmetic_rankings(5, seed=3, ks=(4, 2, 3)), start=1))
    enc, _ = encode_rankings(tok, rows, "r.jsonl", policy.config.block_size, "error")
    b = ranking_batch(enc, tok.eot_id)
    with torch.no_grad():
        b.ref = sequence_logprobs(ref, b.layout, b.answer_len)
    beta = 0.3
    got = preference_loss(sequence_logprobs(policy, b.layout, b.answer_len) - b.ref, b, beta, loss)
    per_ranking = []
    for e in enc:
        pairs = []
        for bi, wi in e.pairs:  # each pair on its own: 2 policy and 2 reference forwards
            terms = []
            for k in (bi, wi):
                prompt, answer = e.seqs[k][: -e.answer_len[k]], e.seqs[k][-e.answer_len[k] :]
                terms.append(plain_logp(policy, prompt, answer) - plain_logp(ref, prompt, answer))
            h = terms[0] - terms[1]
            pairs.append(-F.logsigmoid(beta * h) if loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
        per_ranking.append(torch.stack(pairs).mean())
    want = torch.stack(per_ranking).mean()
    assert want.item() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_run_learns_and_logs_its_metrics(full_run, sft_run):
    out, last = full_run
    log = read_jsonl(out / "log.jsonl")
    assert log[0]["step"] == 0 and log[0]["train_rankings"] + log[0]["val_rankings"] == 60
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    # step 1 reads the policy before any update: it is the reference, the log-ratios are 0
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and abs(steps[0]["kl_ref"]) < 1e-5
    assert abs(steps[0]["reward_margin"]) < 1e-5
    assert sum(r["loss"] for r in steps[-3:]) / 3 < steps[0]["loss"] - 0.05
    assert steps[-1]["reward_margin"] > 0.1 and steps[-1]["kl_ref"] > 0
    evals = [r for r in log if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8] and last["val_loss"] < 0.6931
    assert last["val_reward_margin"] > 0
    assert {"rewards_chosen", "rewards_rejected", "accuracy", "val_kl_ref"} <= set(last)
    model, tok = load_model(out)  # the DPO policy loads like any checkpoint
    init = load_model(sft_run)[0].weights()
    assert tok is not None
    for name, w in model.weights().items():
        assert not torch.equal(w, init[name]), f"{name} did not change"


def key(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")} for r in rows]


@pytest.mark.parametrize("keep_reference", [True, False])
def test_resume_gives_identical_numbers(full_run, sft_run, rankings, tmp_path, keep_reference, monkeypatch):
    """From the step-4 checkpoint with the cached reference (the initial weights are not loaded again), or
    with the cache lost (recomputed from the policy): the same log rows and weights as the uninterrupted run."""
    out, _ = full_run
    shutil.copytree(out / "step_0000004", tmp_path / "step_0000004")
    (tmp_path / "latest").write_text("step_0000004\n")
    if keep_reference:
        shutil.copy(out / REFERENCE_FILE, tmp_path / REFERENCE_FILE)
    loaded = []
    real = dpo_module.from_pretrained
    monkeypatch.setattr(dpo_module, "from_pretrained", lambda p: loaded.append(str(p)) or real(p))
    dpo(dpo_config(sft_run, rankings, tmp_path, *STEPS), quiet=True)
    want_loads = [str(tmp_path / "step_0000004")] + ([] if keep_reference else [str(sft_run)])
    assert loaded == want_loads
    assert (tmp_path / REFERENCE_FILE).read_text() == (out / REFERENCE_FILE).read_text()
    want = [r for r in read_jsonl(out / "log.jsonl") if r["step"] > 4]
    assert key(read_jsonl(tmp_path / "log.jsonl")) == key(want)
    a, b = load_model(out)[0].weights(), load_model(tmp_path)[0].weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(full_run, sft_run, rankings, tmp_path):
    out, _ = full_run
    cmd = [sys.executable, "-m", "fastrlhf", "dpo", "--quiet", *args(sft_run, rankings, tmp_path, *STEPS)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    victim = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (tmp_path / "latest").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path))["step"] < 8
    resumed = subprocess.run(cmd, check=False, env=env, stderr=subprocess.PIPE)
    assert resumed.returncode == 0, resumed.stderr.decode()
    got = read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 9))
    assert key(got) == key(read_jsonl(out / "log.jsonl"))
    a, b = load_model(out)[0].weights(), load_model(tmp_path)[0].weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plackett_luce_and_pair_files_train(sft_run, tmp_path):
    """The listwise loss runs on K-wise rankings; chosen/rejected lines are read as K = 2 rankings."""
    pairs = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": r.prompt, "chosen": r.responses[r.ranking[0]], "rejected": r.responses[r.ranking[1]]}
        for r in arithmetic_rankings(30, seed=5)
    ]
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    last = dpo(dpo_config(sft_run, pairs, tmp_path / "pairs", "train.max_steps=3"), quiet=True)
    log = read_jsonl(tmp_path / "pairs" / "log.jsonl")
    assert log[0]["train_pairs"] == log[0]["train_rankings"] and last["loss"] > 0
    ranks = write_ranking_file(tmp_path / "r.jsonl", arithmetic_rankings(30, seed=6))
    extra = ["dpo.loss=plackett_luce", "train.max_steps=3"]
    last = dpo(dpo_config(sft_run, ranks, tmp_path / "pl", *extra), quiet=True)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "pl" / "log.jsonl") if "loss" in r]
    # at the reference every ordering of K = 4 answers is as likely: -log P(ranking) = log 4!
    assert losses[0] == pytest.approx(math.log(24), abs=1e-4)
    assert torch.isfinite(torch.tensor(losses)).all() and last["val_accuracy"] >= 0


def test_a_policy_from_a_hugging_face_folder_with_a_chat_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    chatml = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["What is 1+2? 3 4 5 6 7 8 9 0"] * 10,
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = HFTokenizer(bpe, {"eos_token": "<|im_end|>", "chat_template": chatml})
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        block_size=64,
        n_layer=1,
        n_head=2,
        n_kv_head=1,
        n_embd=16,
        intermediate_size=24,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", tok)
    ranks = write_ranking_file(tmp_path / "r.jsonl", arithmetic_rankings(20, seed=2, ks=(3,)))
    dpo(dpo_config(tmp_path / "hf", ranks, tmp_path / "o", "train.max_steps=2"), quiet=True)
    before, after = from_pretrained(tmp_path / "hf"), from_pretrained(tmp_path / "o")
    assert type(after) is LlamaForCausalLM and after.config == before.config
    w0, w1 = before.weights(), after.weights()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_bad_input_is_named(sft_run, rankings, tmp_path):
    with pytest.raises(
        ValueError, match=r"dpo.loss must be one of \['sigmoid', 'ipo', 'plackett_luce'\]; got 'hinge'"
    ):
        dpo_config(sft_run, rankings, tmp_path, "dpo.loss=hinge")
    for beta in ("0", "-0.1"):
        with pytest.raises(ValueError, match=rf"dpo.beta must be in \(0.0, inf\); got {beta}"):
            dpo_config(sft_run, rankings, tmp_path, f"dpo.beta={beta}")
    bad = tmp_path / "bad.jsonl"
    ok = json.dumps({"prompt": "What is 1+1?", "responses": ["2", "3"], "ranking": [0, 1]})
    bad.write_text(
        ok + "\n" + json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]})
    )
    with pytest.raises(FormatError, match=r"bad.jsonl:2: ranking must be a permutation of range\(3\)"):
        dpo(dpo_config(sft_run, bad, tmp_path / "o"), quiet=True)
    bad.write_text(ok + "\n" + json.dumps({"prompt": "p", "responses": ["a"], "ranking": [0]}))
    with pytest.raises(FormatError, match=r"bad.jsonl:2: a ranking needs K >= 2 responses; got K = 1"):
        dpo(dpo_config(sft_run, bad, tmp_path / "o"), quiet=True)
    with pytest.raises(ValueError, match="policy is empty"):
        dpo(dpo_config("", rankings, tmp_path / "o"), quiet=True)


def test_overlong_answers_are_refused_by_line_or_truncated_and_counted(sft_run, tmp_path):
    _, tok = load_model(sft_run)
    rows = list(numbered_rankings(write_ranking_file(tmp_path / "r.jsonl", arithmetic_rankings(4, seed=1))))
    long = Ranking("What is 1+1?", ["2", "2 " * 40, "3"], [0, 2, 1])
    rows.insert(2, (3, long))
    with pytest.raises(
        ValueError,
        match=r"r.jsonl:3: prompt \+ answer 1 is \d+ tokens \(\d+ of them the prompt\), more than the policy's block_size 32; set data.overlong",
    ):
        encode_rankings(tok, rows, "r.jsonl", 32, "error")
    enc, truncated = encode_rankings(tok, rows, "r.jsonl", 32, "truncate")
    assert truncated == 1 and len(enc[2].seqs[1]) == 32 and enc[2].answer_len[1] < 40
    with pytest.raises(ValueError, match=r"r.jsonl:7: prompt \+ answer 0 is \d+ tokens"):
        encode_rankings(tok, [(7, Ranking("long " * 40, ["a", "b"], [0, 1]))], "r.jsonl", 32, "truncate")


def test_a_resume_with_other_rankings_is_refused(full_run, sft_run, tmp_path):
    out, _ = full_run
    shutil.copy(out / REFERENCE_FILE, tmp_path / REFERENCE_FILE)
    other = write_ranking_file(tmp_path / "other.jsonl", arithmetic_rankings(30, seed=9))
    with pytest.raises(ValueError, match="holds the reference log-probs of another policy, other rankings"):
        dpo(dpo_config(sft_run, other, tmp_path), quiet=True)


def _rank(rank, port, config_args):
    """One of two gloo ranks (the environment torchrun would set) running the same DPO run."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.setup("cpu")
    dpo(load_config(DPOConfig, None, config_args), quiet=True)
    dist.cleanup()


def test_two_ranks_match_one_process(full_run, sft_run, rankings, tmp_path):
    """Under torchrun each rank takes half of every batch's rankings; the logged curve (loss and the pair
    metrics, summed over the ranks) and the weights equal one process's on the same global batch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = mp.start_processes(
        _rank,
        args=(port, args(sft_run, rankings, tmp_path, *STEPS)),
        nprocs=2,
        start_method="fork",
        join=False,
    )
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):  # a rank that fails raises here
        assert time.monotonic() < deadline, "the 2-rank DPO run did not finish in 120 s"
    out, _ = full_run
    keys = ["step", "loss", "grad_norm", "reward_margin", "accuracy", "kl_ref", "val_loss", "val_accuracy"]
    one, two = (
        [[r.get(k, 0.0) for k in keys] for r in read_jsonl(d / "log.jsonl") if r["step"] > 0]
        for d in (out, tmp_path)
    )
    assert len(one) == len(two) == 10
    for r1, r2 in zip(one, two):
        assert all(math.isclose(x, y, rel_tol=2e-4, abs_tol=1e-5) for x, y in zip(r1, r2)), (r1, r2)
    a, b = load_model(out)[0].weights(), load_model(tmp_path)[0].weights()
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


def test_lora_trains_the_adapters_against_the_base_and_resumes(full_run, sft_run, rankings, tmp_path):
    """[lora] r > 0: the reference is the policy's own base (the same reference log-probs as full fine-tuning
    from the same SFT model); only the adapters move; a resume whose reference cache was lost recomputes it
    from the base with the adapters off and repeats the run; the next stage loads the merged model."""
    from fastrlhf.models.lora import LoraLinear

    lora = [*STEPS, "lora.r=2", "lora.alpha=4", "lora.targets=c_attn,c_fc", "optim.lr=1e-2"]
    out = tmp_path / "a"
    dpo(dpo_config(sft_run, rankings, out, *lora), quiet=True)
    full_out, _ = full_run
    assert (out / REFERENCE_FILE).read_text() == (full_out / REFERENCE_FILE).read_text()
    rows = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
    merged, sft = load_model(out)[0], load_model(sft_run)[0]
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert any(not torch.equal(v, sft.weights()[k]) for k, v in merged.weights().items())
    resumed = tmp_path / "b"
    shutil.copytree(out / "step_0000004", resumed / "step_0000004")
    (resumed / "latest").write_text("step_0000004\n")
    dpo(dpo_config(sft_run, rankings, resumed, *lora), quiet=True)  # no reference file: recomputed
    assert (resumed / REFERENCE_FILE).read_text() == (out / REFERENCE_FILE).read_text()
    assert key(read_jsonl(resumed / "log.jsonl")) == key(
        [r for r in read_jsonl(out / "log.jsonl") if r["step"] > 4]
    )
    with pytest.raises(ValueError, match="was trained from policy"):  # full fine-tuning cannot resume it
        dpo(dpo_config(sft_run, rankings, out, "train.max_steps=9"), quiet=True)
