"""One GRPO step end to end (issue 19's shapes): a GPT-2 shaped policy (n_layer 4, n_head 4, n_embd 256,
vocab 512, as bench_ppo_step.py); 16 prompts of 32 tokens x 4 samples, 64 new tokens (no EOS, so every
answer is 64 long), beta 0 (no reference), token-mean loss, one update on the whole batch. Validates first
(the trainer's invariant: ratio == 1 at the first minibatch; finite metrics; full-length answers), then
prints the median step time and its split (generate / score / train). With --trl on it also times TRL's
GRPOTrainer (the newest trl) in this process on the same shapes, weights, reward and thread count, one TRL
step then one of ours; ratio = TRL time / ours. trl is not in the test extra: `.venv/bin/pip install trl`.

    .venv/bin/python benchmarks/bench_grpo.py --threads 2 [--reps 5] [--trl auto|on|off]"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time

import torch
from _common import report
from fastrlhf.config import load_config
from fastrlhf.models import GPT, GPTConfig
from fastrlhf.rl.grpo import GRPOConfig, GRPOTrainer

SPLIT = ("generate", "score", "train")


def fives(prompts, responses) -> list[float]:
    """The reward on token ids both trainers score with: the fraction of the answer's tokens that are id 5."""
    return [sum(t == 5 for t in r) / max(len(r), 1) for r in responses]


def policy(a: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=a.vocab,
        block_size=a.prompt_len + a.new,
        n_layer=a.n_layer,
        n_head=a.n_head,
        n_embd=a.n_embd,
    )
    return GPT(cfg)


def prompts(a: argparse.Namespace) -> list[list[int]]:
    # ids 1 .. vocab - 2: 0 is TRL's pad and vocab - 1 its EOS
    return torch.randint(
        1, a.vocab - 1, (a.prompts, a.prompt_len), generator=torch.Generator().manual_seed(1)
    ).tolist()


def tokenizer(vocab: int):
    """A word-level tokenizer with one word per id ("<pad>" 0, "<unk>" 1, "<eos>" vocab - 1, "t<id>" else):
    TRL's GRPOTrainer reads prompts as text. The special words are no prefix of another word (HF matches
    special tokens inside words first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "<eos>": vocab - 1, **{f"t{i}": i for i in range(2, vocab - 1)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def our_trainer(a: argparse.Namespace) -> GRPOTrainer:
    """Our trainer on the shapes above, validated by one step (the trainer itself raises if the first
    minibatch's ratio is not 1); here also finite metrics and full-length answers."""
    batch = a.prompts * a.samples
    cfg = load_config(
        GRPOConfig,
        None,
        [
            f"grpo.prompts_per_step={a.prompts}",
            f"grpo.group_size={a.samples}",
            f"grpo.minibatch={batch}",
            "grpo.epochs=1",
            f"grpo.max_new_tokens={a.new}",
            "grpo.beta=0",
            "grpo.loss_agg=token_mean",
            "optim.warmup_steps=0",
            "train.max_steps=1000",
            "train.out_dir=/tmp/bench_grpo_unused",
        ],
    )
    trainer = GRPOTrainer(cfg, policy(a), fives, prompts(a), eos_token_id=None, quiet=True)
    first = trainer.step()
    assert all(math.isfinite(first[k]) for k in ("loss", "approx_kl", "ratio_mean", "entropy")), first
    assert first["response_length"] == a.new, first
    assert first["first_ratio_dev"] < 1e-3 and abs(first["ratio_mean"] - 1) < 1e-4, first
    print(
        f"validated: metrics finite, answers {a.new} tokens; first minibatch max |ratio - 1| "
        f"{first['first_ratio_dev']:.1e}, approx_kl {first['approx_kl']:.1e}"
    )
    return trainer


def time_trl(a: argparse.Namespace, between) -> dict[str, float]:
    """Median ms of one step of TRL's GRPOTrainer on the same policy weights, prompts and reward (generate
    = its _generate call; train = the rest of the step after scoring), between() run after each TRL step
    off the clock. Needs trl (and its datasets, accelerate)."""
    import tempfile
    import warnings

    from datasets import Dataset
    from fastrlhf.models.hf import to_hf_model
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    now, marks = time.perf_counter, [{}]
    batch, steps = a.prompts * a.samples, a.reps + 1

    def reward(prompts, completions, completion_ids, **kw):
        return fives(None, completion_ids)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks[-1]["start"] = now()

        def on_step_end(self, args, state, control, **kw):
            marks[-1]["end"] = now()
            between()
            marks.append({})

    tok = tokenizer(a.vocab)
    ids = prompts(a)
    text = [" ".join(tok.convert_ids_to_tokens(p)) for p in ids]
    assert tok(text)["input_ids"] == ids, "the prompt text does not encode back to the prompts"
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TRLConfig(
            output_dir=out,
            per_device_train_batch_size=batch,  # completions per step: 16 prompts x 4
            gradient_accumulation_steps=1,
            num_generations=a.samples,
            max_completion_length=a.new,
            generation_kwargs={"min_new_tokens": a.new},  # no EOS before 64 tokens, as ours
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",  # token mean over the batch
            num_iterations=1,
            learning_rate=1e-5,
            max_steps=steps,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            seed=0,
            bf16=False,
            fp16=False,
            disable_tqdm=True,
        )
        trainer = TRLTrainer(
            model=to_hf_model(policy(a)).train(),
            reward_funcs=reward,
            args=cfg,
            train_dataset=Dataset.from_dict({"prompt": text * steps}),
            processing_class=tokenizer(a.vocab),
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        generate = trainer._generate

        def timed_generate(*args, **kw):
            marks[-1]["gen0"] = now()
            result = generate(*args, **kw)
            marks[-1]["gen1"] = now()
            return result

        score = trainer._generate_and_score_completions

        def timed_score(*args, **kw):
            result = score(*args, **kw)
            marks[-1]["score1"] = now()
            return result

        trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score
        trainer.train()
    done = [
        m for m in marks[1:] if {"start", "gen0", "gen1", "score1", "end"} <= set(m)
    ]  # the first: warm-up
    if not done:
        raise RuntimeError(f"TRL ran {len(marks) - 1} steps with every mark; expected {steps}")
    parts = {
        "total": ("start", "end"),
        "generate": ("gen0", "gen1"),
        "score": ("gen1", "score1"),
        "train": ("score1", "end"),
    }
    return {k: statistics.median(m[y] - m[x] for m in done) * 1e3 for k, (x, y) in parts.items()}


def split_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians in ms of our steps' total and its generate / score / train parts."""
    out = {k: statistics.median(r[f"time_{k}"] for r in runs) * 1e3 for k in SPLIT}
    out["total"] = statistics.median(sum(r[f"time_{k}"] for k in SPLIT) for r in runs) * 1e3
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per side; medians are reported")
    ap.add_argument("--trl", choices=("auto", "on", "off"), default="auto", help="time TRL's GRPOTrainer too")
    for name, default in [
        ("prompts", 16),
        ("samples", 4),
        ("prompt-len", 32),
        ("new", 64),
        ("n-layer", 4),
        ("n-head", 4),
        ("n-embd", 256),
        ("vocab", 512),
    ]:
        ap.add_argument(f"--{name}", type=int, default=default, help=f"(default {default})")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ours_tr = our_trainer(a)
    runs: list[dict[str, float]] = []
    base = {k: math.nan for k in ("total", *SPLIT)}
    if a.trl != "off":
        try:  # each TRL step is followed by one of ours (off TRL's clock): load hits both alike
            base = time_trl(a, between=lambda: runs.append(ours_tr.step()))
        except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
            if a.trl == "on":
                raise
            print(f"TRL comparison skipped: {exc}")
    while len(runs) < a.reps + 1:
        runs.append(ours_tr.step())
    ours = split_ms(runs[1:])  # the first ran after TRL's warm-up step
    version = importlib.metadata.version("trl") if math.isfinite(base["total"]) else "-"
    print(f"\nGRPO step split, ms (medians of {len(runs) - 1}; threads {torch.get_num_threads()})")
    print(f"{'':<12} {'total':>8} {'generate':>9} {'score':>8} {'train':>8}  ratio (TRL / ours)")
    for name, d in (("ours", ours), (f"TRL {version}", base)):
        ratio = "  ".join(f"{k} {base[k] / d[k]:.2f}x" for k in ("total", *SPLIT)) if name == "ours" else ""
        print(
            f"{name:<12} {d['total']:>8.0f} {d['generate']:>9.0f} {d['score']:>8.0f} {d['train']:>8.0f}  {ratio}"
        )
    report(
        f"GRPO step (policy L{a.n_layer} H{a.n_head} C{a.n_embd} V{a.vocab}; {a.prompts} prompts x {a.samples} "
        f"samples, {a.prompt_len} prompt tokens, {a.new} new, beta 0, token mean, 1 update)",
        [
            dict(
                op="grpo step",
                shape=f"P{a.prompts} G{a.samples} Tp{a.prompt_len} Tr{a.new}",
                baseline=f"TRL {version} GRPOTrainer",
                base_ms=base["total"],
                ours_ms=ours["total"],
                goal=">= 4x",
                **{f"{p}_ms": v for p, v in ours.items() if p != "total"},
                **{f"trl_{p}_ms": v for p, v in base.items() if p != "total"},
            )
        ],
    )
    print(f"(bench wall time {time.perf_counter() - t0:.0f} s)")
    return ours


if __name__ == "__main__":
    main()
