"""Issue 22 in labeling: a prompt's answers depend only on the seed and its index (an interrupted label run
resumes with an uninterrupted one's answers), every answer gets the whole budget (a prompt without room is
refused, named), and one labeler per rankings file."""

import subprocess
import sys

import pytest
import torch
from fastrlhf.cli import main
from fastrlhf.data import encode_prompt
from fastrlhf.data.formats import read_rankings
from fastrlhf.labeling.answers import label_to_file
from fastrlhf.labeling.labelers import make_labeler
from fastrlhf.models.load import load_model
from fastrlhf.tasks.registry import load_task

HOLD = (
    "import sys, time; from fastrlhf.io.lock import RunLock; RunLock.for_file(sys.argv[1], 'ranking').acquire(); "
    "print('held', flush=True); time.sleep(60)"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def label(sft_run, out, *extra):
    args = ["label", "--sft", str(sft_run), "--out", str(out), "--max-new-tokens", "6", "--k", "3"]
    return main([*args, "--prompts", "arithmetic", "--batch-prompts", "3", *extra])


class Interrupting:
    """The arithmetic labeler, with a Ctrl-C after `n` rankings (what a kill between two appends leaves)."""

    def __init__(self, n):
        self.inner, self.n = make_labeler("arithmetic"), n

    def rank(self, prompt, responses):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.inner.rank(prompt, responses)

    def __getattr__(self, name):  # scores, notice, ...
        return getattr(self.inner, name)


def test_an_interrupted_label_run_resumes_with_the_uninterrupted_answers(sft_run, tmp_path):
    model, tok = load_model(sft_run)
    prompts = load_task("arithmetic").prompts("train")[:8]
    kw = dict(k=3, batch_prompts=3, max_new_tokens=6, seed=5, temperature=1.0)
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    label_to_file(model, tok, prompts, make_labeler("arithmetic"), whole, **kw)
    with pytest.raises(KeyboardInterrupt):  # stopped mid-chunk (prompts 3-5), after 4 rankings
        label_to_file(model, tok, prompts, Interrupting(4), cut, **kw)
    assert len(read_rankings(cut)) == 4
    stats, _ = label_to_file(model, tok, prompts, make_labeler("arithmetic"), cut, **kw)
    assert stats.skipped == 4 and read_rankings(cut) == read_rankings(whole)
    assert not list(tmp_path.glob("*.resume"))  # removed once every chunk was ranked


def test_a_prompt_without_room_for_the_whole_budget_is_refused_by_name(sft_run, tmp_path, capsys):
    model, tok = load_model(sft_run)
    size = model.config.block_size
    long = next(
        p for n in range(1, 40) if size - 6 < len(encode_prompt(tok, p := "What is " + "1+" * n + "1?"))
    )
    (tmp_path / "p.txt").write_text(f"What is 1+1?\n{long}\n")
    args = ["label", "--sft", str(sft_run), "--out", str(tmp_path / "r.jsonl"), "--max-new-tokens", "6"]
    assert main([*args, "--prompts", str(tmp_path / "p.txt"), "--labeler", "arithmetic", "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert f"prompt {long!r} is" in err and f"> the model's block_size {size}" in err


def test_one_labeler_per_rankings_file_and_other_bad_outs(sft_run, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert label(sft_run, out, "--limit", "2") == 2
        assert f"{out} is being written by another process (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not out.exists()  # refused before anything was written
    assert label(sft_run, tmp_path, "--limit", "2") == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err
    assert label(sft_run, out, "--limit", "1", "--temperature", "0") == 0
    assert "warning: --temperature 0 samples greedily" in capsys.readouterr().err
