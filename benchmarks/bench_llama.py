"""The Llama family end to end at SmolLM2-135M's shape (30 layers, d 576, 9/3 heads, FFN 1536, vocab 49152,
tied), random init: ours vs transformers' LlamaForCausalLM (sdpa) with the same weights, same process,
same threads. Validates first (same loss, same greedy tokens), then times:

- a training step (forward, backward, AdamW), B x T tokens, fp32; with --bf16 also under bf16 autocast
  (ours and HF's, both against HF fp32), where the CPU has AVX512-BF16/AMX;
- sampling n prompts x new tokens, top-k 50, top-p 0.9, against HF generate; with --bf16 also both sides
  with bf16 weights (ours against HF fp32 and HF bf16);
- peak memory of the training step, each side in a fresh child process (ru_maxrss above the model's);
- the split of our step's time by kind of op (torch.profiler), so the next bottleneck is visible.
Ratio = HF / ours (higher is better)."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys

import torch
import transformers
from _common import interleaved_ms, interleaved_times, machine, report
from fastrlhf.models import generate
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.llama import LlamaForCausalLM, config_to_hf
from fastrlhf.train.optim import OptimConfig, make_adamw

SMOLLM2 = dict(
    vocab_size=49152,
    block_size=2048,
    n_layer=30,
    n_head=9,
    n_kv_head=3,
    n_embd=576,
    intermediate_size=1536,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
SPLIT = {  # our step's ops by kind (torch.profiler self time)
    "GEMMs (all linears)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "rows_linear"),
    "attention": ("causal_attention",),
    "rotary": ("aten::cos", "aten::sin", "aten::cat", "aten::neg", "rope"),
    "norms": ("rms_norm", "aten::rsqrt", "aten::pow", "aten::mean", "layer_norm"),
    "MLP gate (SwiGLU)": ("swiglu", "silu"),
    "LM head + loss": ("linear_cross_entropy", "token_logprobs", "cross_entropy", "log_softmax", "nll_loss"),
    "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "sqrt"),
}


def models(cfg: LlamaConfig):
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg)
    hc = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    hc._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hc)
    hf.load_state_dict(ours.state_dict(), strict=False)  # the rotary buffers are HF's own
    return ours, hf


def steps(ours, hf, x, bf16: bool):
    opt_ours, opt_hf = make_adamw(ours, OptimConfig()), make_adamw(hf, OptimConfig())

    def cast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step_ours():
        with cast():
            loss = ours(
                x, torch.roll(x, -1, 1).masked_fill(torch.arange(x.shape[1]) == x.shape[1] - 1, -100)
            )[1]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        with cast():
            loss = hf(x, labels=x).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    return step_ours, step_hf


def train_rows(args, cfg: LlamaConfig) -> list[dict]:
    B, T = args.batch, args.seq
    ours, hf = models(cfg)
    ours.train(), hf.train()
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    torch.testing.assert_close(ours(x, y)[1], hf(x, labels=x).loss, atol=1e-4, rtol=1e-4)
    print("validated: equal loss")
    rows = []
    shape = f"SmolLM2-135M B{B} T{T}"
    ours32, hf32 = steps(ours, hf, x, bf16=False)
    if args.bf16:
        ours16, hf16 = steps(ours, hf, x, bf16=True)
        times = interleaved_times([hf32, ours32, hf16, ours16], args.reps)
        b32, o32, b16, o16 = [statistics.median(t) for t in times]
        rows.append(dict(op="train step bf16", shape=shape, baseline="HF fp32", base_ms=b32, ours_ms=o16))
        rows.append(
            dict(op="train step bf16", shape=shape, baseline="HF bf16 autocast", base_ms=b16, ours_ms=o16)
        )
    else:
        times = interleaved_times([hf32, ours32], args.reps)
        b32, o32 = [statistics.median(t) for t in times]
    rows.insert(
        0,
        dict(
            op="train step fp32",
            shape=shape,
            baseline="HF LlamaForCausalLM sdpa",
            base_ms=b32,
            ours_ms=o32,
            goal=">= 1.5x",
            paired_ratio=statistics.median(b / o for b, o in zip(times[0], times[1])),
            tokens_per_s_ours=B * T / o32 * 1e3,
        ),
    )
    split(ours32)
    return rows


def split(step) -> None:
    """Our step's self time by kind of op, so the next bottleneck is visible."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total, parts = 0.0, dict.fromkeys([*SPLIT, "other"], 0.0)
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3
        total += ms
        kind = next((k for k, keys in SPLIT.items() if any(s in e.key for s in keys)), "other")
        parts[kind] += ms
    print(f"\nour training step by kind of op ({total:.0f} ms of self time):")
    for k, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<22} {ms:>9.0f} ms  {ms / total:6.1%}")
    print("JSON " + json.dumps({"op": "train step split", **{k: round(v, 1) for k, v in parts.items()}}))


def gen_rows(args, cfg: LlamaConfig) -> list[dict]:
    n, new = args.prompts, args.new_tokens
    ours, hf = models(cfg)
    ours.eval(), hf.eval()
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 33, (n,), generator=g).tolist()
    prompts = [torch.randint(1, cfg.vocab_size, (k,), generator=g).tolist() for k in lens]
    Tp = max(lens)
    ids = torch.tensor([[0] * (Tp - len(p)) + p for p in prompts])  # left padding, as HF wants for decoding
    attn = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None

    def run_hf(**kw):
        return hf.generate(ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new, **kw)[:, Tp:]

    greedy = (
        (run_hf(do_sample=False) == generate(ours, prompts, new, temperature=0.0).responses).float().mean()
    )
    assert greedy > 0.9, f"greedy tokens agree on only {greedy:.0%} of positions"
    print(f"validated: greedy tokens agree on {greedy:.0%} of positions")
    kw = dict(top_k=50, top_p=0.9)
    fns = [lambda: run_hf(do_sample=True, **kw), lambda: generate(ours, prompts, new, **kw, generator=g)]
    if args.bf16:  # bf16 weights for sampling: half the bytes each decode step reads
        ours16, hf16 = copy.deepcopy(ours).bfloat16(), copy.deepcopy(hf).bfloat16()
        fns += [
            lambda: hf16.generate(
                ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new, do_sample=True, **kw
            ),
            lambda: generate(ours16, prompts, new, **kw, generator=g),
        ]
    ms = interleaved_ms(fns, args.reps)
    shape = f"{n} prompts x {new} new"
    rows = [
        dict(
            op="generate",
            shape=shape,
            baseline="HF generate",
            base_ms=ms[0],
            ours_ms=ms[1],
            goal=">= 5x",
            tokens_per_s_ours=n * new / ms[1] * 1e3,
        )
    ]
    if args.bf16:
        for baseline, base in (("HF generate", ms[0]), ("HF generate, bf16 weights", ms[2])):
            rows.append(
                dict(
                    op="generate, bf16 weights",
                    shape=shape,
                    baseline=baseline,
                    base_ms=base,
                    ours_ms=ms[3],
                    tokens_per_s_ours=n * new / ms[3] * 1e3,
                )
            )
    return rows


def peak_child(which: str, args) -> None:
    """In a fresh process: a training step's peak RSS above the RSS before it (MiB), printed as JSON; the
    second step, so that the optimizer state is already there (Linux: VmHWM reset through clear_refs)."""
    cfg = LlamaConfig(**{**SMOLLM2, "n_layer": args.layers})
    ours, hf = models(cfg)
    ours.train(), hf.train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    step_ours, step_hf = steps(ours, hf, x, bf16=False)
    step = step_ours if which == "ours" else step_hf
    step()  # the optimizer state is allocated in the first step: measure the second
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (the peak RSS) to the current RSS
        f.write("5")
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_rows(args) -> list[dict]:
    peaks = {}
    for which in ("hf", "ours"):
        cmd = [
            sys.executable,
            __file__,
            "--peak-child",
            which,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--layers",
            str(args.layers),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[which] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    ratio = peaks["ours"] / peaks["hf"]
    print(
        f"\npeak memory of a training step above the model: HF {peaks['hf']:.0f} MiB, ours {peaks['ours']:.0f} MiB "
        f"({ratio:.2f}x HF's; goal <= 0.7x)"
    )
    print(
        "JSON "
        + json.dumps(
            {
                "op": "train step peak memory",
                "hf_mib": peaks["hf"],
                "ours_mib": peaks["ours"],
                "ratio": ratio,
                **machine(),
            }
        )
    )
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30, help="fewer layers for a quick run")
    ap.add_argument("--only", choices=("train", "generate", "memory"), help="run one part")
    ap.add_argument(
        "--bf16", action="store_true", help="also time bf16 autocast steps and sampling with bf16 weights"
    )
    ap.add_argument("--peak-child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        return peak_child(args.peak_child, args)
    cfg = LlamaConfig(**{**SMOLLM2, "n_layer": args.layers})
    rows = []
    if args.only in (None, "train"):
        rows += train_rows(args, cfg)
    if args.only in (None, "generate"):
        rows += gen_rows(args, cfg)
    if args.only in (None, "memory"):
        memory_rows(args)
    if rows:
        report(
            f"Llama family at SmolLM2-135M's shape ({cfg.n_layer} layers), {torch.get_num_threads()} threads",
            rows,
        )


if __name__ == "__main__":
    main()
