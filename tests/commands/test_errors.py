"""Issue 22, items 13-14: bad inputs end with one `error:` line (exit 2) that names the field or the file,
never a traceback, and nothing is written."""

import os

import torch
from fastrlhf.cli import main
from helpers.pretrain import TINY


def pretrain_args(data_dir, out, *extra):
    return [
        "pretrain",
        *TINY,
        f"train.data_dir={data_dir}",
        f"train.out_dir={out}",
        "train.max_steps=1",
        *extra,
    ]


def cases(data_dir, sft_run, tmp):
    """(argv, what the error line must say) of each case (a read-only folder binds no root process)."""
    (tmp / "file").write_text("x")
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("Qu'est-ce que 2+2 ? caf\xe9\n".encode("latin-1"))
    (tmp / "readonly").mkdir()
    os.chmod(tmp / "readonly", 0o500)
    label = ["label", "--sft", str(sft_run), "--k", "2", "--limit", "1"]
    return [
        (["data", str(tmp / "empty.txt"), "--out", str(tmp / "d1")], f"{tmp / 'empty.txt'} is empty"),
        (["data", str(tmp), "--out", str(tmp / "d2")], f"{tmp} is a directory"),
        (pretrain_args(data_dir, tmp / "file"), str(tmp / "file")),
        (pretrain_args(data_dir, tmp / "file" / "run"), str(tmp / "file")),
        *(
            []
            if os.geteuid() == 0
            else [(pretrain_args(data_dir, tmp / "readonly" / "run"), str(tmp / "readonly"))]
        ),
        (pretrain_args(data_dir, tmp / "r1", "train.device=cuda"), "train.device=cuda"),
        (
            [*label, "--prompts", "arithmetic", "--out", str(tmp / "l.jsonl"), "--labeler", "jsonl"],
            "--labeler-file",
        ),
        (
            [
                *label,
                "--prompts",
                str(tmp / "latin1.txt"),
                "--labeler",
                "arithmetic",
                "--out",
                str(tmp / "l.jsonl"),
            ],
            f"{tmp / 'latin1.txt'} is not UTF-8",
        ),
        (["generate", "--checkpoint", str(sft_run), "--num-samples", "0", "What is 1+1?"], "--num-samples"),
    ]


def test_bad_inputs_end_with_one_error_line_naming_the_field_or_file(data_dir, sft_run, tmp_path, capsys):
    failures = []
    for argv, says in cases(data_dir, sft_run, tmp_path):
        if "train.device=cuda" in argv and torch.cuda.is_available():
            continue
        try:
            rc = main(argv)
        except BaseException as exc:  # noqa: BLE001 (a traceback is a failure too: list it with the rest)
            rc = repr(exc)
        err = capsys.readouterr().err.strip().splitlines()
        if rc != 2 or len(err) != 1 or not err[0].startswith("error: ") or says not in err[0]:
            failures.append((argv[0], says, rc, err[-3:]))
    assert not failures, "\n".join(map(str, failures))
