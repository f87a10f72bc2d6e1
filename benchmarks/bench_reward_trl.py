"""Reward-model training step, ours vs HF TRL 1.12's RewardTrainer (issue 4: >= 1.5x), on the same GPT-2
shaped model (n_layer 4, n_head 4, n_embd 256), the same weights and the same batch: 8 (chosen, rejected)
pairs of 128 tokens. Ours is the K-wise loss with K = 2 (8 rankings of 2 responses) through the trainer's
own `optimizer_step` and its default shared-prefix forward (model.shared: each pair's prompt runs once,
the last block past its keys/values only at the read token; exact, fewer FLOPs); TRL's is `RewardTrainer.training_step` (forward + loss + backward) plus the rest of
its inner loop's step (gradient clipping, AdamW, scheduler, zero_grad). Both collate the batch every step.
Validates first: same rewards, same loss, and the same rewards after one AdamW step on each side.
A second row times whole `RewardTrainer.train()` steps (data loader, logging) against the same step of ours;
a third times ours through the plain full forward (train.share_prefix=false) against TRL's step.
Caveat: running a pair's prompt once is an algorithmic advantage of batching a ranking's responses
together (TRL scores chosen and rejected as two independent full sequences), not a faster kernel.

    .venv/bin/python benchmarks/bench_reward_trl.py --threads 1 [--vocab 4096] [--reps 9] [--quick]

Needs trl==1.12.*, accelerate and datasets (not CI dependencies): without them it says so and exits 0."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from _common import interleaved_ms, report
from fastrlhf.models import GPTConfig, ScalarHeadModel
from fastrlhf.train.optim import OptimConfig, lr_at, make_adamw, optimizer_step
from fastrlhf.train.reward import kwise_loss, score_batch

LR = 1e-4  # TRL's RewardConfig default; warmup 0, so both sides take exactly this step first


def make_models(vocab: int, seq: int, seed: int = 0, jitter: float = 0.0):
    """(ours, hf): a ScalarHeadModel and a GPT2ForSequenceClassification with equal weights (head bias 0:
    HF's score head has none). jitter > 0 adds noise to every weight first (zero biases and unit LayerNorm
    gains would hide a mis-mapped one in a test)."""
    from fastrlhf.models.hf import config_to_hf_dict, state_dict_to_hf
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=seq, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
    ours = ScalarHeadModel(cfg).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * jitter)
    hf_cfg = {k: v for k, v in config_to_hf_dict(cfg).items() if k != "architectures"}
    hf = GPT2ForSequenceClassification(GPT2Config(**hf_cfg, num_labels=1, pad_token_id=0))
    sd = {
        k.removeprefix("transformer."): v
        for k, v in state_dict_to_hf(ours.trunk).items()
        if k != "lm_head.weight"
    }
    missing, unexpected = hf.transformer.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), (
        missing,
        unexpected,
    )
    with torch.no_grad():
        ours.head.bias.zero_()
        hf.score.weight.copy_(ours.head.weight)  # (1, C)
    return ours, hf.train()


def make_pairs(n_pairs: int, seq: int, vocab: int, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    """n_pairs (chosen, rejected) id lists of seq tokens sharing a prompt of seq // 2; ids avoid the pad
    (0) and EOS (vocab - 1) ids, since HF locates the scored token as the last non-pad one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_pairs):
        prompt = torch.randint(1, vocab - 1, (seq // 2,), generator=g).tolist()
        a, b = (torch.randint(1, vocab - 1, (seq - seq // 2,), generator=g).tolist() for _ in range(2))
        out.append((prompt + a, prompt + b))
    return out


def hf_rewards(hf, pairs) -> torch.Tensor:
    """(2P,) HF rewards of all chosen then all rejected sequences (TRL's collator order)."""
    ids = torch.tensor([c for c, _ in pairs] + [r for _, r in pairs])  # (2P, T)
    return hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.squeeze(-1)


def our_rewards(rm, pairs) -> torch.Tensor:
    """(2P,) our rewards in the same order (K-wise batches interleave chosen, rejected per ranking)."""
    r = score_batch(rm, [([c, w], [(0, 1)]) for c, w in pairs], 0, torch.device("cpu"))[0]  # (2P,)
    return torch.cat([r[0::2], r[1::2]])


def trl_trainer(hf, pairs, vocab: int, out: str, steps: int, batch: int, callbacks=()):
    """A RewardTrainer on pre-tokenized pairs: fp32 on the CPU, no gradient checkpointing (TRL's default
    turns it on, which would make TRL slower), AdamW with TRL's defaults, no warmup."""
    from bench_ppo_trl import _tokenizer
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = RewardConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        warmup_steps=0,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
    )
    data = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    return RewardTrainer(
        model=hf, args=cfg, train_dataset=data, processing_class=_tokenizer(vocab), callbacks=list(callbacks)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    try:
        import trl
    except ImportError as exc:
        print(f"TRL comparison skipped: {exc} (pip install --no-deps 'trl==1.12.*' accelerate datasets)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()
    P, T, reps = (4, 64, 3) if args.quick else (args.pairs, args.seq, args.reps)
    pairs = make_pairs(P, T, args.vocab)
    rm, hf = make_models(args.vocab, T)
    optim = OptimConfig(lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, beta2=0.999)  # = TRL's AdamW
    opt = make_adamw(rm, optim)
    batch = [([c, w], [(0, 1)]) for c, w in pairs]  # 8 rankings of K = 2
    cpu = torch.device("cpu")

    def ours_step(share: bool = True) -> float:
        return optimizer_step(
            rm,
            opt,
            lambda i: kwise_loss(*score_batch(rm, batch, 0, cpu, share)),
            1,
            lr_at(0, optim, 1),
            optim.grad_clip,
        )[0]

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl_trainer(hf, pairs, args.vocab, out, steps=1000, batch=P)
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        # what Trainer._inner_training_loop sets up before its first step
        model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.current_gradient_accumulation_steps = 1
        examples = [{"chosen_ids": c, "rejected_ids": r} for c, r in pairs]

        def trl_step() -> float:
            inputs = trainer.data_collator(examples)  # like ours, collate every step
            loss = trainer.training_step(model, inputs)  # forward + TRL loss + backward
            trainer._clip_grad_norm(model)  # then the rest of Trainer._inner_training_loop's step
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad()
            return loss.item()

        with torch.no_grad():
            r_ours, r_hf = our_rewards(rm, pairs), hf_rewards(hf, pairs)
        torch.testing.assert_close(r_ours, r_hf, rtol=1e-4, atol=1e-5)
        loss_hf = trainer.compute_loss(hf, trainer.data_collator(examples)).item()
        loss_ours, loss_trl = ours_step(), trl_step()
        assert abs(loss_ours - loss_hf) < 1e-5 and abs(loss_trl - loss_hf) < 1e-5, (
            loss_ours,
            loss_trl,
            loss_hf,
        )
        with torch.no_grad():  # one AdamW step each from equal weights and grads: equal weights again
            torch.testing.assert_close(our_rewards(rm, pairs), hf_rewards(hf, pairs), rtol=1e-3, atol=1e-4)
        print(
            f"all results match: {2 * P} rewards, loss {loss_ours:.6f} (ours) == {loss_trl:.6f} (TRL "
            f"training_step) == {loss_hf:.6f} (TRL compute_loss), rewards equal after one AdamW step each"
        )

        base_ms, ours_ms, plain_ms = interleaved_ms([trl_step, ours_step, lambda: ours_step(False)], reps)

        trl_loop, ours_loop, start = [], [], [0.0]
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback

        class Clock(
            TrainerCallback
        ):  # after each TRL step (but the first), one of ours: load hits both alike
            def on_step_end(self, *a, **kw):
                t0 = time.perf_counter()
                trl_loop.append(t0 - start[0])
                ours_step()
                ours_loop.append(time.perf_counter() - t0)
                start[0] = time.perf_counter()

        # the whole loop, data loader and logging included; its model is a fresh copy (the same weights)
        full = trl_trainer(
            make_models(args.vocab, T)[1],
            pairs * (reps + 1),
            args.vocab,
            out,
            steps=reps + 1,
            batch=P,
            callbacks=[Clock()],
        )
        full.remove_callback(PrinterCallback)  # its per-step log lines
        full.train()
        loop_ms, ours_again = (
            statistics.median(t[1:]) * 1e3 for t in (trl_loop, ours_loop)
        )  # first: warm-up

    shape = f"{P} pairs x {T} tok, V{args.vocab}"
    report(
        f"reward model training step (fwd + bwd + clip + AdamW), L4 H4 C256, TRL {trl.__version__}",
        [
            dict(
                op="rm_step K=2",
                shape=shape,
                baseline="TRL training_step+AdamW",
                base_ms=base_ms,
                ours_ms=ours_ms,
                goal=">= 1.5x",
            ),
            dict(
                op="rm_step K=2",
                shape=shape,
                baseline="TRL train() per step",
                base_ms=loop_ms,
                ours_ms=ours_again,
                goal="",
            ),
            dict(
                op="rm_step K=2 plain fwd",
                shape=shape,
                baseline="TRL training_step+AdamW",
                base_ms=base_ms,
                ours_ms=plain_ms,
                goal="",
            ),
        ],
    )


if __name__ == "__main__":
    main()
