"""The run-checkpoint format: every trainer writes one model record; checkpoints written before it (the
RM's state.model, the others' state.config.model) still load; a folder of the wrong kind is named."""

import pytest
import torch
from fastrlhf.io import checkpoint as ckpt
from fastrlhf.models import GPT, GPTConfig, ScalarHeadModel
from fastrlhf.models.config import LlamaConfig
from fastrlhf.models.families import build_model
from fastrlhf.models.load import lm_record, load_model, load_scalar_model, scalar_record

CFG = GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=8)


def test_models_of_every_family_round_trip_through_their_record(tmp_path):
    for cfg in (
        CFG,
        LlamaConfig(
            vocab_size=40, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=8, intermediate_size=12
        ),
    ):
        torch.manual_seed(0)
        lm, rm = build_model(cfg), ScalarHeadModel(cfg)
        ckpt.save_checkpoint(tmp_path / "lm", 1, models={"model": lm}, record=lm_record(lm))
        ckpt.save_checkpoint(tmp_path / "rm", 1, models={"model": rm}, record=scalar_record(rm))
        back, _ = load_model(tmp_path / "lm")
        assert type(back) is type(lm) and all(
            torch.equal(a, b) for a, b in zip(back.parameters(), lm.parameters())
        )
        rm_back, _ = load_scalar_model(tmp_path / "rm")
        assert all(torch.equal(a, b) for a, b in zip(rm_back.parameters(), rm.parameters()))


def test_checkpoints_from_before_the_record_still_load(tmp_path):
    torch.manual_seed(1)
    lm, rm = GPT(CFG), ScalarHeadModel(CFG)
    # exactly what the trainers wrote before: the LM's config under state.config.model, the RM's under state.model
    ckpt.save_checkpoint(
        tmp_path / "sft", 3, models={"model": lm}, state={"config": {"model": CFG.to_dict()}}
    )
    ckpt.save_checkpoint(
        tmp_path / "rm", 3, models={"model": rm}, state={"config": {}, "model": CFG.to_dict()}
    )
    assert "model" not in ckpt.read_state(tmp_path / "sft" / "step_0000003")
    back, _ = load_model(tmp_path / "sft")
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), lm.parameters()))
    rm_back, _ = load_scalar_model(tmp_path / "rm")
    assert all(torch.equal(a, b) for a, b in zip(rm_back.parameters(), rm.parameters()))


def test_a_folder_of_the_wrong_kind_is_named(tmp_path):
    lm, rm = GPT(CFG), ScalarHeadModel(CFG)
    ckpt.save_checkpoint(tmp_path / "sft", 1, models={"model": lm}, record=lm_record(lm))
    ckpt.save_checkpoint(tmp_path / "rm", 1, models={"model": rm}, record=scalar_record(rm))
    with pytest.raises(ValueError, match="holds a language model, not a reward model"):
        load_scalar_model(tmp_path / "sft")
    with pytest.raises(ValueError, match="holds a reward model .* not a language model"):
        load_model(tmp_path / "rm")
    ckpt.save_checkpoint(tmp_path / "bare", 1, models={"model": lm})
    with pytest.raises(ValueError, match="records no model"):
        load_model(tmp_path / "bare")
