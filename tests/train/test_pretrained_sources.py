"""The recipe from a model made outside fastrlhf (issue 18): SFT starts from a Hugging Face folder (a
random-init Llama saved by transformers, with a chat template), the reward model and PPO start from that
SFT run, and each stage keeps the family, the weights it was given and the tokenizer's chat template."""

import pytest
import torch
from fastrlhf.cli import main
from fastrlhf.models.llama import LlamaForCausalLM
from fastrlhf.models.load import from_pretrained, is_pretrained_source, load_model
from fastrlhf.train.log import read_jsonl
from helpers.hf_models import tiny_llama_folder
from helpers.sft import arithmetic_rankings, write_demos, write_ranking_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_llama_folder(tmp_path_factory.mktemp("hf_llama"))


def test_sft_rm_and_ppo_start_from_a_hugging_face_folder(hf_folder, tmp_path):
    assert is_pretrained_source(hf_folder) and not is_pretrained_source(tmp_path)
    demos, sft_run = write_demos(tmp_path / "demos.jsonl", n=64), tmp_path / "sft"
    common = ["train.device=cpu", "train.threads=1", "train.log_interval=1", "train.batch_size=4"]
    sft = [
        f"train.init_from={hf_folder}",
        f"data.source={demos}",
        f"train.out_dir={sft_run}",
        "train.max_steps=3",
    ]
    assert main(["sft", "--quiet", *sft, *common, "train.eval_interval=3"]) == 0
    model, tok = load_model(sft_run)
    base = from_pretrained(hf_folder)
    assert isinstance(model, LlamaForCausalLM) and model.config == base.config
    assert tok.chat_template and "<|im_start|>" in tok.chat_template  # the chat format travels with the run
    moved = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert moved, "SFT changed no weight"
    assert [r["step"] for r in read_jsonl(sft_run / "log.jsonl") if "loss" in r][-1] == 3
    more = [a.replace("max_steps=3", "max_steps=4") for a in sft]
    assert main(["sft", "--quiet", *more, *common, "train.eval_interval=3"]) == 0  # resumes the Llama run
    assert [r["step"] for r in read_jsonl(sft_run / "log.jsonl") if "loss" in r] == [1, 2, 3, 4]

    rankings, rm_run = (
        write_ranking_file(tmp_path / "rankings.jsonl", arithmetic_rankings(24)),
        tmp_path / "rm",
    )
    rm = [f"train.sft={sft_run}", f"data.train={rankings}", f"train.out_dir={rm_run}", "train.max_steps=2"]
    assert main(["rm", *rm, *common, "data.val_fraction=0.3"]) == 0
    assert main(["rm", *[a.replace(str(sft_run), str(hf_folder)) for a in rm], *common[:-1],
                 f"train.out_dir={tmp_path / 'rm_hf'}", "data.val_fraction=0.3"]) == 0  # fmt: skip

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"What is {a}+{b}?\n" for a in range(3) for b in range(4)))
    ppo = [f"models.policy={sft_run}", f"models.reward={rm_run}", f"train.prompts={prompts}"]
    ppo += [
        f"train.out_dir={tmp_path / 'ppo'}",
        "train.threads=1",
        "train.max_steps=2",
        "train.log_interval=1",
    ]
    ppo += ["ppo.rollout_batch=4", "ppo.minibatch=2", "ppo.max_new_tokens=4", "train.dtype=fp32"]
    assert main(["ppo", "--quiet", *ppo]) == 0
    rows = [r for r in read_jsonl(tmp_path / "ppo" / "log.jsonl") if "ratio_mean" in r]
    assert len(rows) == 2 and all(abs(r["ratio_mean"] - 1) < 1e-2 for r in rows)
    policy, _ = load_model(tmp_path / "ppo")
    assert isinstance(policy, LlamaForCausalLM)
    lora = [a.replace(str(tmp_path / "ppo"), str(tmp_path / "ppo_lora")) for a in ppo] + ["lora.r=4"]
    assert main(["ppo", "--quiet", *lora]) == 0  # no reference copy: the base with its adapters off
    rows = [r for r in read_jsonl(tmp_path / "ppo_lora" / "log.jsonl") if "kl" in r]
    assert len(rows) == 2 and abs(rows[0]["kl"]) < 1e-4
    assert isinstance(load_model(tmp_path / "ppo_lora")[0], LlamaForCausalLM)  # merged for the next stage


def test_a_missing_source_names_every_kind_it_accepts(tmp_path):
    with pytest.raises(FileNotFoundError, match="nor is it a Hugging Face model folder"):
        load_model(tmp_path / "nowhere")


def test_sft_with_lora_trains_only_the_adapters_and_the_next_stage_gets_the_merged_model(hf_folder, tmp_path):
    from fastrlhf.io import checkpoint as ckpt
    from fastrlhf.io.safetensors import read_safetensors
    from fastrlhf.models.lora import LoraLinear

    demos, run = write_demos(tmp_path / "demos.jsonl", n=64), tmp_path / "sft"
    args = [
        f"train.init_from={hf_folder}",
        f"data.source={demos}",
        f"train.out_dir={run}",
        "train.device=cpu",
    ]
    args += ["train.threads=1", "train.batch_size=4", "train.eval_interval=3", "lora.r=4", "lora.alpha=8"]
    args += ["optim.lr=1e-2", "optim.min_lr=1e-2", "optim.warmup_steps=0"]
    assert main(["sft", "--quiet", *args, "train.max_steps=2"]) == 0
    assert main(["sft", "--quiet", *args, "train.max_steps=3"]) == 0  # resumes with its adapters
    latest = ckpt.latest_checkpoint(run)
    record = ckpt.read_model_record(ckpt.read_state(latest))
    assert record["lora"]["r"] == 4 and ckpt.read_state(latest)["step"] == 3
    saved, base = read_safetensors(latest / "model.safetensors"), from_pretrained(hf_folder).state_dict()
    adapters = {k for k in saved if ".lora_" in k}
    assert adapters and all(torch.equal(saved[k], base[k]) for k in saved if k not in adapters)  # base frozen
    assert any(".lora_B." in k and saved[k].abs().max() > 0 for k in adapters)  # B left zero: it learned
    optim_state = read_safetensors(latest / "trainer.safetensors")
    assert sum(v.numel() for k, v in optim_state.items() if "exp_avg" in k) == 2 * sum(
        saved[k].numel() for k in adapters
    )  # AdamW's moments for the adapters only

    merged, _ = load_model(run)  # the next stage: one plain model, the update merged in
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    x = torch.randint(0, merged.config.vocab_size, (2, 9))
    with_adapters = from_pretrained(hf_folder)
    from fastrlhf.config import from_dict
    from fastrlhf.models.lora import LoraConfig, add_lora

    add_lora(with_adapters, from_dict(LoraConfig, record["lora"]))
    with_adapters.load_weights(saved)
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], with_adapters(x)[0], rtol=1e-5, atol=1e-5)


def test_a_lora_reward_model_and_critic_share_the_policys_base(hf_folder, tmp_path):
    """issue 20, one base copy: a LoRA reward model trained on a LoRA SFT run sits as adapters + head on the
    PPO policy's own base weights, and the critic copied from it too (its adapters and head train); the
    base, the reference (adapters off) and the reward model's adapters stay as they were."""
    from fastrlhf.config import load_config
    from fastrlhf.rl.build import build_trainer
    from fastrlhf.rl.config import PPOConfig

    common = ["train.device=cpu", "train.threads=1", "train.batch_size=4", "lora.r=4"]
    demos, sft_run, rm_run = write_demos(tmp_path / "demos.jsonl", n=32), tmp_path / "sft", tmp_path / "rm"
    sft = [f"train.init_from={hf_folder}", f"data.source={demos}", f"train.out_dir={sft_run}"]
    assert main(["sft", "--quiet", *sft, *common, "train.max_steps=2", "train.eval_interval=2"]) == 0
    rankings = write_ranking_file(tmp_path / "rankings.jsonl", arithmetic_rankings(24))
    rm = [f"train.sft={sft_run}", f"data.train={rankings}", f"train.out_dir={rm_run}", "train.max_steps=2"]
    assert main(["rm", "--quiet", *rm, *common, "data.val_fraction=0.3", "optim.lr=1e-2"]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"What is {a}+{b}?\n" for a in range(3) for b in range(4)))
    cfg = load_config(PPOConfig, None, [
        f"models.policy={sft_run}", f"models.reward={rm_run}", f"train.prompts={prompts}",
        f"train.out_dir={tmp_path / 'ppo'}", "train.threads=1", "train.max_steps=2", "ppo.rollout_batch=4",
        "ppo.minibatch=2", "ppo.max_new_tokens=4", "lora.r=4", "optim.lr=1e-2",
    ])  # fmt: skip
    tr = build_trainer(cfg, quiet=True)
    frozen = {id(p) for p in tr.policy.parameters() if not p.requires_grad}
    for m in (tr.reward.trunk, tr.value.trunk):
        base = [p for n, p in m.named_parameters() if ".lora_" not in n]
        assert base and all(id(p) in frozen for p in base)  # the policy's own tensors: one copy
    trainable = {n for n, p in tr.value.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    before = {
        n: p.detach().clone() for n, p in [*tr.policy.named_parameters(), *tr.reward.named_parameters()]
    }
    value_before = {n: p.detach().clone() for n, p in tr.value.named_parameters() if p.requires_grad}
    tr.train()
    after = dict([*tr.policy.named_parameters(), *tr.reward.named_parameters()])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_" in n for n in changed)  # only the policy's adapters moved
    assert not any(n.startswith("head") or "trunk" in n for n in changed)  # the reward model is frozen
    assert any(
        not torch.equal(p, value_before[n]) for n, p in tr.value.named_parameters() if n in value_before
    )
