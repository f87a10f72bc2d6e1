import shutil

import pytest
import torch
import torch.nn.functional as F
from fastrlhf.data import ByteBPETokenizer, encode_chat
from fastrlhf.data.formats import FormatError, SFTExample
from fastrlhf.models import GPT, IGNORE_INDEX, GPTConfig
from fastrlhf.models.load import load_model
from fastrlhf.train.log import read_jsonl
from fastrlhf.train.sft import encode_examples, pack, pack_batch, sft, token_losses
from helpers.sft import sft_config, write_demos


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and a loaded 2-core machine makes two threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("sft") / "demos.jsonl")


@pytest.fixture(scope="module")
def full_run(demos, tmp_path_factory):
    """An uninterrupted 16-step run with dropout and checkpoints at 8 and 16."""
    out = tmp_path_factory.mktemp("sft_full")
    args = [
        f"data.source={demos}",
        "train.max_steps=16",
        "train.ckpt_interval=8",
        "train.eval_interval=8",
        "model.dropout=0.1",
    ]
    last = sft(sft_config(*args, f"train.out_dir={out}"), quiet=True)
    return out, args, last


@pytest.fixture(scope="module")
def tok():
    texts = [f"Prompt: What is {a}+{b}?\nResponse: {a + b}" for a in range(10) for b in range(10)]
    return ByteBPETokenizer.train(texts, 300)


def test_loss_falls_and_every_parameter_changes(full_run, demos, tmp_path):
    out, _, last = full_run
    log = read_jsonl(out / "log.jsonl")
    assert log[0]["step"] == 0 and log[0]["dropped"] == 0 and log[0]["train_examples"] == 228
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    assert [r["step"] for r in log if "val_loss" in r] == [8, 16] and last["val_loss"] < losses[0]
    model, tok = load_model(out)
    assert tok is not None
    torch.manual_seed(1337)  # train.seed: the weights the run started from
    init = GPT(model.config).weights()
    for name, w in model.weights().items():
        assert not torch.equal(w, init[name]), f"{name} did not change"


def test_resume_gives_identical_numbers(full_run, tmp_path):
    out, args, _ = full_run
    shutil.copytree(out / "step_0000008", tmp_path / "step_0000008")  # as if the run died after step 8
    (tmp_path / "latest").write_text("step_0000008\n")
    sft(sft_config(*args, f"train.out_dir={tmp_path}"), quiet=True)
    key = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
    want = [key(r) for r in read_jsonl(out / "log.jsonl") if r["step"] > 8]
    assert [key(r) for r in read_jsonl(tmp_path / "log.jsonl")] == want
    a, b = load_model(out)[0].weights(), load_model(tmp_path)[0].weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_packing_equals_each_example_alone(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    examples = [
        SFTExample("What is 3+4?", "7"),
        SFTExample("What is 9+9?", "18 exactly"),
        SFTExample("hi", "ok"),
    ]
    enc, _, _ = encode_examples(tok, examples, 48, "drop")
    rows = pack(enc, 48)
    assert len(rows) == 1 and len(rows[0]) == 3  # all three share one row
    idx, targets, positions, segments = pack_batch(rows, 48, tok.eot_id)
    packed = F.cross_entropy(
        model(idx, positions=positions, segment_ids=segments)[0][0],
        targets[0],
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # (T,)
    o = 0
    for j, (ids, mask) in enumerate(enc):
        n = len(ids)
        alone_idx, alone_t, _, _ = pack_batch([[(ids, mask)]], n, tok.eot_id)
        alone = F.cross_entropy(
            model(alone_idx)[0][0], alone_t[0], ignore_index=IGNORE_INDEX, reduction="none"
        )
        torch.testing.assert_close(packed[o : o + n], alone, rtol=1e-5, atol=1e-5)
        assert segments[0, o : o + n].unique().tolist() == [j + 1]
        assert positions[0, o : o + n].tolist() == list(range(n))
        o += n
    assert (targets[0, o:] == IGNORE_INDEX).all() and (segments[0, o:] == 0).all()  # padding
    _total, count = token_losses(model, (idx, targets, positions, segments), torch.device("cpu"))
    assert int(count) == sum(sum(m[1:]) for _, m in enc)  # response tokens (and EOT) only


def test_loss_counts_response_tokens_only(tok):
    ids, mask = encode_chat(tok, "What is 2+2?", "4")
    _, targets, _, _ = pack_batch([[(ids, mask)]], 32, tok.eot_id)
    want = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    assert targets[0, : len(ids) - 1].tolist() == want
    assert (targets[0, len(ids) - 1 :] == IGNORE_INDEX).all()
    assert [t for t in want if t != IGNORE_INDEX][-1] == tok.eot_id  # the model learns to stop


def test_overlong_examples_dropped_or_truncated_and_counted(tok):
    examples = [
        SFTExample("What is 1+1?", "2"),
        SFTExample("What is 1+1?", "2 " * 40),
        SFTExample("long " * 40, "x"),
    ]
    enc, dropped, truncated = encode_examples(tok, examples, 24, "drop")
    assert (len(enc), dropped, truncated) == (1, 2, 0)
    enc, dropped, truncated = encode_examples(tok, examples, 24, "truncate")
    # the long response is cut to 24 tokens; the long prompt leaves no response token and is dropped
    assert (len(enc), dropped, truncated) == (2, 1, 1) and len(enc[1][0]) == 24


def test_overlong_flag_is_checked_and_the_run_reports_counts(demos, tmp_path):
    with pytest.raises(ValueError, match="data.overlong must be 'drop' or 'truncate'; got 'cut'"):
        sft_config("data.overlong=cut")
    with pytest.raises(ValueError, match=r"no SFT example fits the context of 4 tokens \(\d+ train"):
        sft(sft_config(f"data.source={demos}", f"train.out_dir={tmp_path}", "train.block_size=4"), quiet=True)


def test_malformed_sft_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respons": "b"}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:2: an SFT example is missing field 'response'"):
        sft(sft_config(f"data.source={bad}", f"train.out_dir={tmp_path / 'o'}"), quiet=True)
    bad.write_text('{"prompt": "a", "response": "  "}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:1: response is empty"):
        sft(sft_config(f"data.source={bad}", f"train.out_dir={tmp_path / 'o'}"), quiet=True)
    with pytest.raises(FileNotFoundError, match="neither a task"):
        sft(sft_config(f"data.source={tmp_path / 'missing.jsonl'}"), quiet=True)
