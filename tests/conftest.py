import pytest
import torch
from fastrlhf.data import corpus


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["base", "avx2", "avx512"])
def cpu_path(request):
    """Runs the test on each CPU code path of the kernels (fastrlhf._C.set_cpu_path), skipping only the
    paths this CPU cannot run; the path in use before is restored after."""
    from helpers.cpu_paths import on_path

    with on_path(request.param):
        yield request.param


from helpers.pretrain import make_text


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    docs = [make_text(300, s) for s in range(4)]
    corpus.prepare(docs, corpus.build_tokenizer("bpe", docs, 300), out, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """A tiny SFT model trained for 30 steps on one-digit arithmetic (shared by reward and label tests)."""
    from fastrlhf.train.sft import sft
    from helpers.sft import sft_config, write_demos

    root = tmp_path_factory.mktemp("sft_shared")
    demos = write_demos(root / "demos.jsonl")
    out = root / "run"
    sft(
        sft_config(
            f"data.source={demos}", f"train.out_dir={out}", "train.max_steps=30", "train.eval_interval=30"
        ),
        quiet=True,
    )
    return out
