"""fastrlhf: the InstructGPT recipe (pretrain, SFT, K-wise reward model, PPO-ptx) on fused kernels."""

from fastrlhf._ext import HAS_EXT, build_info

__version__ = "0.1.0"
__all__ = ["HAS_EXT", "__version__", "build_info", "from_pretrained", "load_tokenizer"]


def from_pretrained(path, dtype=None):
    """The model of a Hugging Face folder, a GGUF file, a fastrlhf run/checkpoint folder or a known name
    ('smollm2-135m-instruct'): `model(input_ids)[0]` gives logits (B, T, V); `model.save_pretrained(dir)`
    writes a folder transformers loads. Imported on first use, so `import fastrlhf` stays light."""
    import torch

    from fastrlhf.models.load import from_pretrained as load

    return load(path, dtype or torch.float32)


def load_tokenizer(path):
    """The tokenizer that goes with from_pretrained(path) (with `apply_chat_template` for chat models)."""
    from fastrlhf.models.load import load_pretrained_tokenizer

    return load_pretrained_tokenizer(path)
