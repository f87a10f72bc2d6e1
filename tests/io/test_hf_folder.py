import json

import pytest
import torch
from fastrlhf.io.hf import is_hf_folder, read_hf_folder, write_hf_folder
from fastrlhf.io.safetensors import INDEX_FILE, SafetensorsFolder, state_dict_dtype, write_safetensors_folder


def tiny_llama_config(**kw):
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **kw,
    )


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(40, 40, generator=g),
        "d.scale": torch.randn(1, generator=g),
    }


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 3000])
def test_write_read_round_trip(tmp_path, max_shard_bytes):
    t = tensors()
    files = write_safetensors_folder(t, tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = max_shard_bytes == 3000
    assert (tmp_path / INDEX_FILE).is_file() == sharded
    assert len(files) == (
        4 if sharded else 1
    )  # 40x40 fp32 = 6400 B alone in a shard: a, c, b+d and the index
    back = SafetensorsFolder(tmp_path)
    assert set(back) == set(t) and back.shapes["a.weight"] == (33, 17)
    for name, v in t.items():
        assert back[name].dtype == v.dtype and torch.equal(back[name], v)
    if sharded:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
        assert min(index["weight_map"].values()) == "model-00001-of-00003.safetensors"
    # a smaller rewrite into the same folder leaves no stale shards behind
    write_safetensors_folder({"x": torch.ones(2)}, tmp_path)
    assert set(SafetensorsFolder(tmp_path)) == {"x"} and not list(tmp_path.glob("model-*"))


def test_tied_tensors_are_written_once_each(tmp_path):
    w = torch.randn(7, 3)
    write_safetensors_folder({"embed.weight": w, "lm_head.weight": w, "half": w[:2]}, tmp_path)
    back = SafetensorsFolder(tmp_path)
    assert torch.equal(back["lm_head.weight"], w) and torch.equal(back["half"], w[:2])
    assert state_dict_dtype({"a": w, "b": torch.zeros(3, dtype=torch.int64)}) == torch.float32


def test_damaged_folders_name_the_file(tmp_path):
    write_safetensors_folder(tensors(), tmp_path, max_shard_bytes=3000)
    shard2 = tmp_path / "model-00002-of-00003.safetensors"
    data = shard2.read_bytes()
    shard2.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        ValueError, match="model-00002-of-00003.safetensors is not a readable safetensors file"
    ):
        SafetensorsFolder(tmp_path)
    shard2.unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00003.safetensors listed in"):
        SafetensorsFolder(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "00002" not in v}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00001-of-00003.safetensors lacks tensor 'ghost.weight'"):
        SafetensorsFolder(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not a safetensors index"):
        SafetensorsFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        SafetensorsFolder(tmp_path / "nowhere")


def test_single_file_truncated(tmp_path):
    write_hf_folder(tmp_path, tiny_llama_config(), tensors())
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        read_hf_folder(tmp_path)


def test_hf_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hf_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object; got list"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="has no model_type"):
        read_hf_folder(tmp_path)
    with pytest.raises(ValueError, match="must be a Hugging Face config dict with a model_type"):
        write_hf_folder(tmp_path, {"hidden_size": 8}, {})


class _Tok:
    def save(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def test_transformers_loads_what_we_write_and_we_read_what_it_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in tiny_llama_config().items() if k != "model_type"})
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = ref(ids).logits

    # theirs -> ours: save_pretrained with small shards, read lazily
    ref.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (tmp_path / "theirs" / INDEX_FILE).is_file()
    folder = read_hf_folder(tmp_path / "theirs")
    assert folder.config["num_key_value_heads"] == 2 and folder.generation_config is not None
    state = ref.state_dict()
    assert set(folder.tensors) == set(state)
    for name, t in folder.tensors.items():
        assert torch.equal(t, state[name]), name

    # ours -> theirs: written sharded with a generation config and the tokenizer's files beside
    out = write_hf_folder(
        tmp_path / "ours",
        folder.config,
        dict(folder.tensors),
        generation_config={"bos_token_id": 1, "eos_token_id": 2},
        tokenizer=_Tok(),
        max_shard_bytes=30_000,
    )
    assert is_hf_folder(out) and (out / "tokenizer.json").is_file() and (out / INDEX_FILE).is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert again.generation_config.eos_token_id == 2
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
