import subprocess
import sys

from fastrlhf.cli import main
from fastrlhf.data import TokenFile
from helpers.pretrain import TINY, make_text


def test_data_pretrain_generate_end_to_end(tmp_path, capsys):
    files = []
    for i in range(2):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(make_text(200, i))
    assert main(["data", *map(str, files), "--out", str(tmp_path / "d"), "--vocab-size", "300"]) == 0
    assert "2 documents" in capsys.readouterr().out
    assert TokenFile(tmp_path / "d" / "val.bin").vocab_size == 300
    (tmp_path / "c.toml").write_text(
        f'[train]\ndata_dir = "{tmp_path / "d"}"\nout_dir = "{tmp_path / "run"}"\n'
    )
    rc = main(
        [
            "pretrain",
            "--config",
            str(tmp_path / "c.toml"),
            *TINY,
            "--train.max_steps=4",
            "train.eval_interval=2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "step      4  val_loss" in out and "tok/s" in out
    (tmp_path / "prompts.txt").write_text("ROMEO.\nJULIET. The\n")
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "run"),
            "--file",
            str(tmp_path / "prompts.txt"),
            "LEAR.",
            "--max-new-tokens",
            "5",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 3 and "=== 'ROMEO.'" in out
    assert (
        main(["generate", "--checkpoint", str(tmp_path / "run"), "x", "--chat", "--max-new-tokens", "3"]) == 0
    )
    assert "=== 'Prompt: x\\nResponse:'" in capsys.readouterr().out


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "hi"]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["pretrain", "model.n_embd=30"]) == 2
    assert "n_embd must be a multiple of n_head" in capsys.readouterr().err


def test_module_entry_point_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "fastrlhf", "--help"], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("data", "pretrain", "generate"))
