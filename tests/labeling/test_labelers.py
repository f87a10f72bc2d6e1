import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from fastrlhf.data.formats import FormatError, Ranking, read_rankings, write_rankings
from fastrlhf.labeling.labelers import (
    JsonlLabeler,
    Labeler,
    Quit,
    ScoreLabeler,
    TerminalLabeler,
    Undo,
    label_prompts,
    labeler_names,
    make_labeler,
    parse_typed_ranking,
)


def test_sentiment_ranks_most_positive_first_ties_by_index():
    lab = make_labeler("sentiment")
    responses = ["the king", "O villain, damned villain!", "I love thee dearly, sweet friend", "the queen"]
    score = lab.scores("x", responses)
    assert score[2] > 0.5 and score[1] < -0.5
    assert score[0] == score[3] == 0.0
    assert lab.rank("x", responses) == [2, 0, 3, 1]  # the two neutral lines keep their order
    assert lab.rank("x", responses[::-1]) == [1, 0, 3, 2]


def test_arithmetic_correct_then_closer_then_unparseable():
    lab = make_labeler("arithmetic")
    responses = ["eighty-two", "80", "82", "-82", "83", "83", "82 apples"]
    # 0: junk, 1: off by 2, 2: right, 3: off by 164, 4: off by 1, 5: off by 1 (tie: index), 6: junk
    assert lab.rank("What is 37+45?", responses) == [2, 4, 5, 1, 3, 0, 6]
    assert lab.rank("What is 3-7?", ["4", " -4 ", "-4\nWhat"]) == [1, 2, 0]
    assert lab.rank("What is 12*11?", ["132", "133"]) == [0, 1]


def test_arithmetic_rejects_a_foreign_prompt():
    with pytest.raises(ValueError, match=r"not an arithmetic prompt .* got 'Tell me a joke'"):
        make_labeler("arithmetic").rank("Tell me a joke", ["a", "b"])


@pytest.mark.parametrize("responses", [[], ["only one"]])
def test_rank_needs_k_at_least_2(responses):
    with pytest.raises(
        ValueError, match=r"cannot rank the responses to 'What is 1\+1\?': a ranking needs K >= 2"
    ):
        make_labeler("arithmetic").rank("What is 1+1?", responses)


def test_rank_rejects_an_empty_response():
    with pytest.raises(ValueError, match=r"responses\[1\] is empty"):
        make_labeler("sentiment").rank("x", ["fine", "   "])


def test_a_plugin_returning_a_non_permutation_is_caught():
    class Broken(Labeler):
        def _rank(self, prompt, responses):
            return [0] * len(responses)

    with pytest.raises(
        RuntimeError, match=r"Broken returned an invalid ranking: ranking must be a permutation"
    ):
        Broken().rank("p", ["a", "b"])


def test_jsonl_labeler_looks_up_by_prompt_and_responses_in_any_order(tmp_path):
    path = tmp_path / "r.jsonl"
    write_rankings(path, [Ranking("p", ["a", "b", "c"], [2, 0, 1]), Ranking("q", ["x", "x", "y"], [2, 0, 1])])
    lab = JsonlLabeler(path)
    assert lab.rank("p", ["a", "b", "c"]) == [2, 0, 1]
    assert lab.rank("p", ["c", "a", "b"]) == [0, 1, 2]  # best "c", then "a", then "b"
    assert lab.rank("q", ["x", "y", "x"]) == [1, 0, 2]  # equal responses are interchangeable
    with pytest.raises(LookupError, match=r"r\.jsonl has no ranking of these 3 responses to 'p'"):
        lab.rank("p", ["a", "b", "d"])


def test_jsonl_labeler_rejects_conflicting_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [
        Ranking("p", ["a", "b"], [0, 1]),
        Ranking("p", ["b", "a"], [1, 0]),
        Ranking("p", ["a", "b"], [1, 0]),
    ]
    write_rankings(path, lines)  # lines 1 and 2 agree (a > b); line 3 says b > a
    with pytest.raises(
        FormatError, match=r"r\.jsonl:3: ranks the same prompt and responses as line 1 differently"
    ):
        JsonlLabeler(path)


def test_jsonl_labeler_reports_a_malformed_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}\n')
    with pytest.raises(FormatError, match=r"r\.jsonl:1: ranking must be a permutation of range\(2\)"):
        JsonlLabeler(path)


def test_make_labeler_builds_each_registered_name(tmp_path):
    write_rankings(tmp_path / "r.jsonl", [])
    assert labeler_names() == ["arithmetic", "jsonl", "sentiment", "terminal", "tone"]
    assert (
        isinstance(make_labeler("arithmetic"), ScoreLabeler)
        and make_labeler("arithmetic").name == "arithmetic"
    )
    assert (
        isinstance(make_labeler("sentiment"), ScoreLabeler) and make_labeler("sentiment").name == "sentiment"
    )
    assert isinstance(make_labeler("jsonl", path=tmp_path / "r.jsonl"), JsonlLabeler)
    assert isinstance(make_labeler("terminal", input=io.StringIO(), output=io.StringIO()), TerminalLabeler)


def test_make_labeler_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown labeler 'vader'; valid names: arithmetic, jsonl, sentiment, terminal"
    ):
        make_labeler("vader")


@pytest.mark.parametrize(
    "text,k,expected",
    [
        ("2 1 4 3", 4, [1, 0, 3, 2]),
        ("2143\n", 4, [1, 0, 3, 2]),
        (" 2, 1 ", 2, [1, 0]),
        ("10 1 2 3 4 5 6 7 8 9", 10, [9, *range(9)]),
    ],
)
def test_parse_typed_ranking(text, k, expected):
    assert parse_typed_ranking(text, k) == expected


@pytest.mark.parametrize(
    "text,match",
    [
        ("2 2 1", "give each of the numbers 1..3 once"),
        ("21", "give each of the numbers 1..3 once"),
        ("0 1 2", "1..3 once"),
        ("first", "type the answer numbers best first, e.g. '2 1 3'"),
        ("", "1..3 once"),
    ],
)
def test_parse_typed_ranking_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_typed_ranking(text, 3)


def terminal(keys):
    out = io.StringIO()
    return TerminalLabeler(io.StringIO(keys), out, clear=False), out


def test_terminal_shows_numbered_answers_and_reads_a_ranking():
    lab, out = terminal("3 1 2\n")
    assert lab.rank("What is 1+1?", ["2", "11", "two\nor so"]) == [2, 0, 1]
    screen = out.getvalue()
    assert "What is 1+1?" in screen and "[1] 2\n[2] 11\n[3] two\n    or so\n" in screen
    assert "u = undo" in screen and "q = save and quit" in screen and "\x1b[2J" not in screen


def test_terminal_asks_again_after_a_bad_line():
    lab, out = terminal("1 1\nbest\n21\n")
    assert lab.rank("p", ["a", "b"]) == [1, 0]
    screen = out.getvalue()
    assert screen.count("=== prompt ===") == 3
    assert "! give each of the numbers 1..2 once" in screen and "! type the answer numbers" in screen


def test_terminal_escapes_control_characters_in_answers():
    lab, out = terminal("12\n")
    lab.rank("p", ["\x1b[2Jgone", "b\x07"])
    assert "[1] \\x1b[2Jgone\n[2] b\\x07\n" in out.getvalue()


def test_terminal_clears_the_screen_when_asked():
    lab = TerminalLabeler(io.StringIO("12\n"), io.StringIO(), clear=True)
    lab.rank("p", ["a", "b"])
    assert lab.output.getvalue().startswith("\x1b[2J\x1b[H")


@pytest.mark.parametrize("keys,exc", [("u\n", Undo), ("Q\n", Quit), ("", Quit)])
def test_terminal_undo_quit_and_end_of_input(keys, exc):
    lab, _ = terminal(keys)
    with pytest.raises(exc):
        lab.rank("p", ["a", "b"])


def test_terminal_ctrl_c_quits():
    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    with pytest.raises(Quit):
        TerminalLabeler(Interrupted(), io.StringIO(), clear=False).rank("p", ["a", "b"])


ITEMS = [(f"prompt {i}", [f"answer {i}a", f"answer {i}b", f"answer {i}c"]) for i in range(4)]


def prompts_and_rankings(path):
    return [(r.prompt, list(r.ranking)) for r in read_rankings(path)]


def test_label_prompts_rank_undo_quit_resume(tmp_path):
    out = tmp_path / "rankings.jsonl"
    lab, screen = terminal("1 2 3\n321\nu\n2 1 3\nq\n")  # rank 0, rank 1, undo at 2, re-rank 1, quit at 2
    stats = label_prompts(lab, ITEMS, out)
    assert (stats.labeled, stats.undone, stats.quit, stats.total) == (3, 1, True, 2)
    assert prompts_and_rankings(out) == [("prompt 0", [0, 1, 2]), ("prompt 1", [1, 0, 2])]
    shown = [line for line in screen.getvalue().splitlines() if line.startswith("prompt ")]
    assert shown == ["prompt 0", "prompt 1", "prompt 2", "prompt 1", "prompt 2"]

    lab, screen = terminal("u\n1 3 2\n3 2 1\n")  # resume at 2; undo reaches back into the earlier session
    stats = label_prompts(lab, ITEMS, out)
    assert (stats.skipped, stats.undone, stats.quit, stats.total) == (2, 1, True, 3)  # input ran out at 3
    assert "* resuming: 2 prompts already ranked" in screen.getvalue()
    assert prompts_and_rankings(out) == [
        ("prompt 0", [0, 1, 2]),
        ("prompt 1", [0, 2, 1]),
        ("prompt 2", [2, 1, 0]),
    ]

    lab, _ = terminal("2 1 3\n")
    stats = label_prompts(lab, ITEMS, out)
    assert (stats.skipped, stats.labeled, stats.quit, stats.total) == (3, 1, False, 4)
    assert [p for p, _ in prompts_and_rankings(out)] == [f"prompt {i}" for i in range(4)]


def test_label_prompts_undo_with_nothing_to_undo(tmp_path):
    lab, screen = terminal("u\n12\n")
    stats = label_prompts(lab, [("p", ["a", "b"])], tmp_path / "r.jsonl")
    assert (stats.labeled, stats.undone, stats.total) == (1, 0, 1)
    assert "* nothing to undo" in screen.getvalue()


def test_label_prompts_samples_only_prompts_not_yet_ranked(tmp_path):
    out = tmp_path / "r.jsonl"
    write_rankings(out, [Ranking("What is 1+1?", ["2", "3"], [0, 1])])
    calls = []

    def sampler(prompt, answers):
        return lambda: calls.append(prompt) or answers

    items = [
        ("What is 1+1?", sampler("What is 1+1?", ["3", "2"])),
        ("What is 2+2?", sampler("What is 2+2?", ["5", "4"])),
    ]
    stats = label_prompts(make_labeler("arithmetic"), items, out)
    assert calls == ["What is 2+2?"] and (stats.skipped, stats.labeled, stats.total) == (1, 1, 2)
    assert read_rankings(out)[1] == Ranking("What is 2+2?", ["5", "4"], [1, 0], [-0.5, 1.0])


def test_label_prompts_bad_item_keeps_what_was_ranked(tmp_path):
    out = tmp_path / "r.jsonl"
    items = [("What is 1+1?", ["2", "3"]), ("What is 2+2?", ["4"])]
    with pytest.raises(ValueError, match=r"'What is 2\+2\?': a ranking needs K >= 2 responses; got K = 1"):
        label_prompts(make_labeler("arithmetic"), items, out)
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["What is 1+1?"]


# --- end to end through a real pseudo-terminal ----------------------------------------------------------

CHILD = """
import fcntl, signal, sys, termios
from fastrlhf.labeling.labelers import TerminalLabeler, label_prompts
# a background job's shell ignores SIGINT and children inherit that: restore Python's Ctrl-C handler
signal.signal(signal.SIGINT, signal.default_int_handler)
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes our controlling terminal: Ctrl-C sends SIGINT
items = [(f"prompt {i}", [f"answer {i}a", f"answer {i}b"]) for i in range(4)]
s = label_prompts(TerminalLabeler(), items, sys.argv[1])
print(f"DONE labeled={s.labeled} undone={s.undone} skipped={s.skipped} quit={s.quit} total={s.total}")
"""


class Session:
    """The labeler in a child process whose stdin/stdout/stderr is a pseudo-terminal we type into."""

    def __init__(self, out_path):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(out_path)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.buf = b""

    def read_until(self, text, timeout=60.0):
        deadline = time.monotonic() + timeout
        while text.encode() not in self.buf:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            try:
                chunk = os.read(self.master, 4096) if ready else b""
            except OSError:  # EIO once the child has exited
                chunk = b""
            if not chunk:
                raise AssertionError(
                    f"no {text!r} on the terminal; it shows:\n{self.buf.decode(errors='replace')}"
                )
            self.buf += chunk
        end = self.buf.index(text.encode()) + len(text)
        seen, self.buf = self.buf[:end].decode(), self.buf[end:]
        return seen

    def screen(self):
        return self.read_until("> ")

    def type(self, keys):
        os.write(self.master, keys.encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


def test_terminal_end_to_end_through_a_pty(tmp_path):
    out = tmp_path / "rankings.jsonl"
    s = Session(out)
    try:
        first = s.screen()
        assert "\x1b[2J" in first and "prompt 0" in first and "[1] answer 0a\r\n[2] answer 0b" in first
        s.type("21\n")
        assert "prompt 1" in s.screen()
        s.type("1 2\n")
        assert "prompt 2" in s.screen()
        s.type("u\n")  # undo: prompt 1 again
        assert "prompt 1" in s.screen()
        s.type("2 1\n")
        assert "prompt 2" in s.screen()
        s.type("q\n")
        s.read_until("DONE labeled=3 undone=1 skipped=0 quit=True total=2")
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.close()
    assert prompts_and_rankings(out) == [("prompt 0", [1, 0]), ("prompt 1", [1, 0])]

    s = Session(out)  # resume, rank one, then Ctrl-C
    try:
        screen = s.screen()
        assert "* resuming: 2 prompts already ranked" in screen and "prompt 2" in screen
        s.type("12\n")
        assert "prompt 3" in s.screen()
        s.type("\x03")
        s.read_until("DONE labeled=1 undone=0 skipped=2 quit=True total=3")
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.close()
    assert prompts_and_rankings(out) == [("prompt 0", [1, 0]), ("prompt 1", [1, 0]), ("prompt 2", [0, 1])]
