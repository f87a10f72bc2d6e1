"""One DPO training step on one K = 4 ranking, ours vs HF TRL's DPOTrainer on the same C(4, 2) = 6 pairs
(issue 19: >= 3x), on the GPT-2 shape of bench_ppo_step.py (n_layer 4, n_head 4, n_embd 256, vocab 512):
a prompt of 64 tokens, four answers of 64 (the last one EOS), the same weights, the same process and threads.

Ours is the trainer's step: the ranking laid out with the prompt once (train.dpo.ranking_batch), the K = 4
answers' log-likelihoods in one prefix-sharing forward, the DPO loss over all 6 pairs, backward, clipping
and AdamW (train.optim.optimizer_step). TRL's is `DPOTrainer.training_step` on the 6 (chosen, rejected)
pairs (12 sequences of 128 tokens) plus the rest of its inner loop's step (clipping, AdamW, scheduler,
zero_grad); both collate the batch every step. Rows:
  1. the reference's log-probs precomputed on both sides (ours caches them in the run folder; TRL's
     precompute_ref_log_probs=True): the headline;
  2. the reference forward inside the step on both sides (ours: K more no-grad forwards; TRL's default:
     a reference model forward on the 12 sequences).
Validates first, with or without TRL: our loss equals the plain pairwise computation (a full forward per
answer per pair on the policy and on the reference); with TRL also equal reference log-probs, equal losses
and equal log-probs after one AdamW step on each side. The ratio is TRL's time / ours; most of it is
algorithmic (4 answers and one prompt instead of 12 full sequences), not a faster kernel.

    .venv/bin/python benchmarks/bench_dpo.py --threads 2 [--reps 9] [--trl auto|on|off] [--quick]

trl is not a CI dependency (`.venv/bin/pip install trl`); --trl auto runs ours only when it is missing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import interleaved_ms, machine, report
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.train.optim import OptimConfig, lr_at, make_adamw, optimizer_step
from fastrlhf.train.preference import Encoded, preference_loss, ranking_batch, sequence_logprobs

LR, BETA = 1e-4, 0.1


def make_models(vocab: int, T: int, layers: int, embd: int, seed: int = 0) -> tuple[GPT, GPT]:
    """(policy, reference): the reference is the policy plus noise, so the log-ratios are not 0."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=T, n_layer=layers, n_head=4, n_embd=embd, dropout=0.0)
    policy, ref = GPT(cfg).train(), GPT(cfg).eval()
    ref.load_weights(policy.weights())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy, ref


def make_ranking(prompt_len: int, answer_len: int, vocab: int, k: int = 4, seed: int = 1) -> Encoded:
    """One prompt and k answers ending in EOS (vocab - 1), ranked 0 > 1 > ... (ids avoid pad 0 and EOS)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab - 1, (prompt_len,), generator=g).tolist()
    answers = [
        torch.randint(1, vocab - 1, (answer_len - 1,), generator=g).tolist() + [vocab - 1] for _ in range(k)
    ]
    pairs = [(b, w) for b in range(k) for w in range(b + 1, k)]
    return Encoded([prompt + a for a in answers], [answer_len] * k, pairs, tuple(range(k)))


def plain_logp(model: GPT, seq: list[int], n: int) -> torch.Tensor:
    """log pi(last n tokens | the rest) from one full forward."""
    x = torch.tensor([seq])
    return torch.log_softmax(model(x)[0][0, :-1], -1).gather(1, x[0, 1:, None])[-n:].sum()


def plain_pairwise_loss(policy: GPT, ref: GPT, e: Encoded) -> torch.Tensor:
    """DPO's loss over the ranking's pairs the usual way: each pair's two answers through both models."""
    losses = []
    for b, w in e.pairs:
        r = [
            plain_logp(policy, e.seqs[i], e.answer_len[i]) - plain_logp(ref, e.seqs[i], e.answer_len[i])
            for i in (b, w)
        ]
        losses.append(-F.logsigmoid(BETA * (r[0] - r[1])))
    return torch.stack(losses).mean()


def word(i: int) -> str:
    """Token i as a word of the bench tokenizer: fixed width, so no special token is a prefix of another
    word (the tokenizer matches special tokens inside words)."""
    return f"w{i:04d}"


def tokenizer(vocab: int):
    """A word-level tokenizer whose ids are ours: word(i) is id i; pad 0, EOS vocab - 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)}, unk_token=word(1)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=word(0), eos_token=word(vocab - 1), unk_token=word(1)
    )


def trl_trainer(hf, hf_ref, e: Encoded, vocab: int, out: str, precompute: bool):
    """A DPOTrainer on the ranking's 6 pairs as text of the bench tokenizer (words w0001 ...): fp32 on the
    CPU, no gradient checkpointing (TRL's default turns it on, which would make TRL slower), no warmup."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    def text(ids: list[int]) -> str:
        return "".join(" " + word(i) for i in ids)

    P = len(e.seqs[0]) - e.answer_len[0]
    rows = {
        "prompt": [text(e.seqs[b][:P]).strip() for b, _ in e.pairs],
        "chosen": [text(e.seqs[b][P:]) for b, _ in e.pairs],
        "rejected": [text(e.seqs[w][P:]) for _, w in e.pairs],
    }
    cfg = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=len(e.pairs),
        max_steps=1000,
        learning_rate=LR,
        beta=BETA,
        warmup_steps=0,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_length=None,
        precompute_ref_log_probs=precompute,
    )
    trainer = DPOTrainer(
        model=hf,
        ref_model=hf_ref,
        args=cfg,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer(vocab),
    )
    data = trainer.train_dataset
    for i, (b, w) in enumerate(e.pairs):  # TRL tokenized the text back into our ids
        assert data[i]["prompt_ids"] + data[i]["chosen_ids"] == e.seqs[b], i
        assert data[i]["prompt_ids"] + data[i]["rejected_ids"] == e.seqs[w], i
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    # what Trainer._inner_training_loop sets up before its first step
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1
    examples = [data[i] for i in range(len(data))]

    def step() -> float:
        inputs = trainer.data_collator(examples)  # like ours, collate every step
        loss = trainer.training_step(model, inputs)  # forward (+ reference forward) + loss + backward
        trainer._clip_grad_norm(model)  # then the rest of Trainer._inner_training_loop's step
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return loss.item()

    return trainer, examples, step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--trl", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps (a smoke run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    V, P, A, layers, embd, reps = (64, 9, 7, 1, 32, 2) if args.quick else (512, 64, 64, 4, 256, args.reps)
    use_trl = args.trl == "on" or (args.trl == "auto" and importlib.util.find_spec("trl") is not None)
    if args.trl == "auto" and not use_trl:
        print("TRL comparison skipped: trl is not installed (.venv/bin/pip install trl)")
    policy, ref = make_models(V, P + A, layers, embd)
    e = make_ranking(P, A, V)
    optim = OptimConfig(lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, beta2=0.999)  # = TRL's AdamW
    opt = make_adamw(policy, optim)
    with torch.no_grad():
        e.ref = sequence_logprobs(ref, ranking_batch([e], 0).layout, torch.tensor(e.answer_len))

    def ours_step(with_ref: bool = False) -> float:
        b = ranking_batch([e], 0)  # collate every step
        if with_ref:
            with torch.no_grad():
                b.ref = sequence_logprobs(ref, b.layout, b.answer_len)

        def loss(i: int) -> torch.Tensor:
            return preference_loss(
                sequence_logprobs(policy, b.layout, b.answer_len) - b.ref, b, BETA, "sigmoid"
            )

        return optimizer_step(policy, opt, loss, 1, lr_at(0, optim, 1), optim.grad_clip)[0]

    b = ranking_batch([e], 0)
    with torch.no_grad():
        ours = preference_loss(sequence_logprobs(policy, b.layout, b.answer_len) - b.ref, b, BETA, "sigmoid")
        plain = plain_pairwise_loss(policy, ref, e)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    assert abs(plain.item() - F.softplus(torch.tensor(0.0)).item()) > 1e-3  # the log-ratios are not all 0
    print(
        f"all results match: loss {ours.item():.6f} (ours, 4 answers) == {plain.item():.6f} (6 pairs, 24 forwards)"
    )
    shape = f"P{P} + 4x{A} tok, V{V}"
    loadavg = Path("/proc/loadavg")
    load = loadavg.read_text().split()[0] if loadavg.is_file() else "?"
    if not use_trl:
        (ours_ms,) = interleaved_ms([ours_step], reps)
        print(f"DPO step, one K = 4 ranking = 6 pairs, L{layers} H4 C{embd}, ours only (no TRL), load {load}")
        print(
            f"{'op':<22} {'shape':<28} {'ours ms':>10}\n{'dpo_step ref cached':<22} {shape:<28} {ours_ms:>10.3f}"
        )
        print(
            "JSON "
            + json.dumps(
                {"op": "dpo_step ref cached", "shape": shape, "ours_ms": ours_ms, "load": load, **machine()}
            )
        )
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    from fastrlhf.models.hf import to_hf_model

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_ref = to_hf_model(ref).eval()
        pre, examples, trl_pre = trl_trainer(to_hf_model(policy).train(), hf_ref, e, V, out, precompute=True)
        _, _, trl_default = trl_trainer(to_hf_model(policy).train(), hf_ref, e, V, out, precompute=False)
        trl_ref = torch.tensor(
            [x["ref_chosen_logps"] for x in examples] + [x["ref_rejected_logps"] for x in examples]
        )
        ours_ref = torch.cat([e.ref[[b for b, _ in e.pairs]], e.ref[[w for _, w in e.pairs]]])
        torch.testing.assert_close(trl_ref, ours_ref, rtol=1e-5, atol=1e-4)
        loss_trl = pre.compute_loss(pre.model, pre.data_collator(examples)).item()
        assert abs(loss_trl - ours.item()) < 1e-5, (loss_trl, ours.item())
        loss_ours, loss_trl_step = ours_step(), trl_pre()  # one AdamW step each from the same weights
        assert abs(loss_ours - loss_trl_step) < 1e-5, (loss_ours, loss_trl_step)
        with torch.no_grad():
            after = pre.compute_loss(pre.model, pre.data_collator(examples)).item()
            mine = preference_loss(
                sequence_logprobs(policy, b.layout, b.answer_len) - b.ref, b, BETA, "sigmoid"
            ).item()
        assert abs(after - mine) < 1e-4 and abs(after - loss_trl) > 1e-5, (after, mine, loss_trl)
        print(
            f"TRL agrees: reference log-probs, loss {loss_trl:.6f}, and loss {after:.6f} after one AdamW step each"
        )
        trl_pre_ms, ours_ms, trl_def_ms, ours_ref_ms = interleaved_ms(
            [trl_pre, ours_step, trl_default, lambda: ours_step(True)], reps
        )
    import trl

    report(
        f"DPO step, one K = 4 ranking = 6 pairs (fwd + bwd + clip + AdamW), L{layers} H4 C{embd}, TRL {trl.__version__}, load {load}",
        [
            dict(
                op="dpo_step ref cached",
                shape=shape,
                baseline="TRL precomputed ref",
                base_ms=trl_pre_ms,
                ours_ms=ours_ms,
                goal=">= 3x",
                load=load,
            ),
            dict(
                op="dpo_step ref forward",
                shape=shape,
                baseline="TRL ref model (default)",
                base_ms=trl_def_ms,
                ours_ms=ours_ref_ms,
                goal="",
                load=load,
            ),
        ],
    )


if __name__ == "__main__":
    main()
