import pytest
from fastrlhf.config import load_config, parse_overrides
from fastrlhf.train.pretrain import PretrainConfig


def test_toml_then_overrides(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[model]\nn_layer = 3\nn_embd = 64\n[optim]\nlr = 1\n[train]\nout_dir = "x"\n'
    )
    cfg = load_config(
        PretrainConfig,
        tmp_path / "c.toml",
        ["model.n_layer=5", "--optim.min_lr=1e-5", "train.dtype=fp32", "model.bias=false"],
    )
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.bias) == (5, 64, False)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.min_lr == 1e-5
    assert cfg.train.out_dir == "x" and cfg.train.dtype == "fp32" and cfg.train.max_steps == 1000


def test_defaults_without_a_file():
    assert load_config(PretrainConfig) == PretrainConfig()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.n_layers=2"], r"unknown field\(s\) \['model.n_layers'\]"),
        (["modle.n_layer=2"], r"unknown section\(s\) \['modle'\]"),
        (["model.n_layer=two"], "model.n_layer must be int; got 'two'"),
        (["model.bias=maybe"], "model.bias must be true or false"),
        (["train.max_steps"], "must look like section.field=value"),
        (["model.n_embd=30"], "n_embd must be a multiple of n_head"),
        (["train.dtype=int8"], "train.dtype must be"),
        (["optim.min_lr=1"], r"optim.min_lr must be in \[0.0, 0.001\]; got 1.0"),
        (["optim.lr=nan"], r"optim.lr must be in \(0.0, inf\); got nan"),
        (["optim.beta1=2"], r"optim.beta1 must be in \[0.0, 1.0\); got 2.0"),
        (["optim.weight_decay=nan"], r"optim.weight_decay must be in \[0.0, inf\); got nan"),
    ],
)
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(PretrainConfig, None, overrides)


def test_bad_toml(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\nn_layer = 3.5\n")
    with pytest.raises(ValueError, match=r"model.n_layer must be int; got 3.5"):
        load_config(PretrainConfig, tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text("[model\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(PretrainConfig, tmp_path / "c.toml")
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": "1"}}}


def test_list_fields_take_a_toml_array_or_commas_on_the_command_line(tmp_path):
    from fastrlhf.train.sft import SFTConfig

    assert load_config(SFTConfig, None, ["lora.targets=q_proj, v_proj"]).lora.targets == ["q_proj", "v_proj"]
    path = tmp_path / "c.toml"
    path.write_text('[lora]\nr = 8\ntargets = ["o_proj"]\n')
    cfg = load_config(SFTConfig, str(path), [])
    assert (cfg.lora.r, cfg.lora.targets) == (8, ["o_proj"])
    path.write_text("[lora]\ntargets = 3\n")
    with pytest.raises(ValueError, match=r"lora.targets must be a list; got 3"):
        load_config(SFTConfig, str(path), [])
    path.write_text("[lora]\ntargets = [1]\n")
    with pytest.raises(ValueError, match=r"lora.targets\[0\] must be str; got 1"):
        load_config(SFTConfig, str(path), [])
