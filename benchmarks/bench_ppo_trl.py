"""The baseline of bench_ppo_step.py: TRL 1.12's PPOTrainer (trl.experimental.ppo) on the same shapes,
weights and threads. Needs trl==1.12.*, accelerate and datasets (pip install --no-deps keeps torch)."""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch


def _classifier(scalar, hf_cfg):
    """A GPT2ForSequenceClassification (what TRL wants for reward and value) with scalar's weights."""
    from fastrlhf.models.hf import state_dict_to_hf
    from transformers import GPT2Config, GPT2ForSequenceClassification

    m = GPT2ForSequenceClassification(GPT2Config(**hf_cfg, num_labels=1))
    sd = {
        k.removeprefix("transformer."): v
        for k, v in state_dict_to_hf(scalar.trunk).items()
        if k != "lm_head.weight"
    }
    m.transformer.load_state_dict(sd, strict=False)
    m.score.weight.data.copy_(scalar.head.weight)  # TRL's score head has no bias
    return m


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", eos_token=f"t{vocab - 1}", unk_token="t1"
    )


def time_trl(
    models,
    n_prompts: int,
    prompt_len: int,
    new: int,
    vocab: int,
    minibatch: int,
    reps: int,
    between: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median ms of one TRL PPO step (batch 16, same shapes and weights) and its split: generate (TRL's
    batch_generation), score (the rest of the rollout: ref/value/reward forwards, rewards, GAE), train (first
    grad-enabled forward to the end of the step, its metrics included) and other (the loop's gc.collect and
    data loading between steps). between() runs after each TRL step, outside the clock: the caller's own
    step, so that load from other processes hits both alike. Needs trl, accelerate, datasets."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from fastrlhf.models.hf import config_to_hf_dict, to_hf_model
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    policy, ref, reward, value = models()
    hf_cfg = {k: v for k, v in config_to_hf_dict(policy.config).items() if k != "architectures"}
    # prompts avoid id 0: TRL treats the pad id as padding when it builds attention masks
    prompts = torch.randint(1, vocab - 1, (n_prompts, prompt_len), generator=torch.Generator().manual_seed(1))
    steps = reps + 1
    marks: list[dict[str, float]] = [{}]  # per step: start, gen0, gen1, train0, end
    now = time.perf_counter

    def timed_generation(*a, **kw):
        marks[-1]["gen0"] = now()
        out = batch_generation(*a, **kw)
        marks[-1]["gen1"] = now()
        return out

    def timed_forward(*a, **kw):
        if torch.is_grad_enabled():  # rollout forwards run under no_grad, the PPO update's with grad
            marks[-1].setdefault("train0", now())
        return forward(*a, **kw)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[-1]["end"] = now()
            if between is not None:
                between()
            marks.append({"start": now()})

    batch_generation, forward = trl_ppo.batch_generation, trl_ppo.forward
    trl_ppo.batch_generation, trl_ppo.forward = timed_generation, timed_forward
    try:
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # rollout batch = per_device x accumulation; minibatch = batch / num_mini_batches: 2 updates of 8 like ours
            cfg = PPOConfig(
                output_dir=out,
                per_device_train_batch_size=n_prompts,
                gradient_accumulation_steps=1,
                num_mini_batches=n_prompts // minibatch,
                local_rollout_forward_batch_size=n_prompts,
                num_ppo_epochs=1,
                response_length=new,
                stop_token=None,
                temperature=0.7,
                total_episodes=n_prompts * steps,
                num_sample_generations=0,
                report_to="none",
                use_cpu=True,
                save_strategy="no",
                logging_steps=1,
                seed=0,
                bf16=False,
                fp16=False,
                disable_tqdm=True,
            )
            trainer = PPOTrainer(
                args=cfg,
                processing_class=_tokenizer(vocab),
                model=to_hf_model(policy).train(),
                ref_model=to_hf_model(ref),
                reward_model=_classifier(reward, hf_cfg),
                train_dataset=Dataset.from_dict({"input_ids": prompts.tolist()}),
                value_model=_classifier(value, hf_cfg),
                callbacks=[Clock()],
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
    finally:
        trl_ppo.batch_generation, trl_ppo.forward = batch_generation, forward
    done = [m for m in marks[1:] if "end" in m]  # the first step (warm-up, no start mark) left out
    if len(done) < 1:
        raise RuntimeError(f"TRL ran {len(marks) - 1} updates; expected {steps}")
    parts = {
        "total": ("start", "end"),
        "generate": ("gen0", "gen1"),
        "score": ("gen1", "train0"),
        "train": ("train0", "end"),
        "other": ("start", "gen0"),
    }
    return {k: statistics.median(m[b] - m[a] for m in done) * 1e3 for k, (a, b) in parts.items()}
