import pytest
import torch
from fastrlhf.cli import main
from fastrlhf.data.formats import read_rankings
from fastrlhf.labeling.answers import sample_answers
from fastrlhf.labeling.labelers import make_labeler
from fastrlhf.models.load import load_model
from fastrlhf.tasks.arithmetic import parse_problem


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and a loaded 2-core machine makes two threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def label(sft_run, out, *extra):
    return main(["label", "--sft", str(sft_run), "--out", str(out), "--max-new-tokens", "6", *extra])


def test_label_writes_rankings_of_k_sampled_answers_and_resumes(sft_run, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert label(sft_run, out, "--prompts", "arithmetic", "--k", "3", "--limit", "6") == 0
    first = read_rankings(out)
    skipped = int(capsys.readouterr().out.split(" skipped")[0].rsplit(", ", 1)[1])
    assert len(first) + skipped == 6 and len(first) >= 3
    lab = make_labeler("arithmetic")
    for r in first:
        parse_problem(r.prompt)  # arithmetic train prompts
        assert r.k == 3 and all(s.strip() for s in r.responses)
        assert list(r.ranking) == lab.rank(r.prompt, r.responses)  # the task's labeler ranked them
    assert label(sft_run, out, "--prompts", "arithmetic", "--k", "3", "--limit", "8") == 0
    again = read_rankings(out)
    assert again[: len(first)] == first  # nothing ranked before is lost or redone
    assert f"{len(first)} already in" in capsys.readouterr().out


def test_sample_answers_batches_k_per_prompt(sft_run):
    model, tok = load_model(sft_run)
    answers = sample_answers(
        model,
        tok,
        ["What is 1+2?", "What is 3*3?"],
        4,
        5,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(answers) == 2 and all(
        a is None or (len(a) == 4 and all(s.strip() for s in a)) for a in answers
    )


def test_prompts_from_text_and_jsonl_files(sft_run, tmp_path):
    txt, js = tmp_path / "p.txt", tmp_path / "p.jsonl"
    txt.write_text("What is 1+1?\n\nWhat is 2+2?\nWhat is 1+1?\n")
    js.write_text('{"prompt": "What is 5-3?"}\n{"prompt": "What is 4*2?", "response": "8"}\n')
    assert (
        label(sft_run, tmp_path / "a.jsonl", "--prompts", str(txt), "--labeler", "arithmetic", "--k", "2")
        == 0
    )
    assert {r.prompt for r in read_rankings(tmp_path / "a.jsonl")} <= {"What is 1+1?", "What is 2+2?"}
    assert (
        label(sft_run, tmp_path / "b.jsonl", "--prompts", str(js), "--labeler", "arithmetic", "--k", "2") == 0
    )
    assert all(r.k == 2 for r in read_rankings(tmp_path / "b.jsonl"))


def test_unknown_labeler(sft_run, tmp_path, capsys):
    assert label(sft_run, tmp_path / "r.jsonl", "--prompts", "arithmetic", "--labeler", "oracle") == 2
    assert (
        "unknown labeler 'oracle'; valid names: arithmetic, jsonl, sentiment, terminal"
        in capsys.readouterr().err
    )


def test_k_below_two(sft_run, tmp_path, capsys):
    assert label(sft_run, tmp_path / "r.jsonl", "--prompts", "arithmetic", "--k", "1") == 2
    assert "--k must be >= 2" in capsys.readouterr().err


def test_bad_prompts_file(sft_run, tmp_path, capsys):
    js = tmp_path / "p.jsonl"
    js.write_text('{"prompt": "What is 5-3?"}\n{"prompt": 7}\n')
    assert label(sft_run, tmp_path / "r.jsonl", "--prompts", str(js), "--labeler", "arithmetic") == 2
    assert "p.jsonl:2: expected an object with a string field 'prompt'" in capsys.readouterr().err
    assert (
        label(sft_run, tmp_path / "r.jsonl", "--prompts", str(tmp_path / "nope.txt"), "--labeler", "x") == 2
    )
    assert "neither a task" in capsys.readouterr().err
    (tmp_path / "ok.txt").write_text("What is 1+1?\n")
    assert label(sft_run, tmp_path / "r.jsonl", "--prompts", str(tmp_path / "ok.txt")) == 2
    assert "--labeler is required when --prompts is a file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sft", "rm", "label"])
def test_commands_are_listed(name, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert name in capsys.readouterr().out
