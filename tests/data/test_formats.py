import json
import os
import subprocess
import sys

import pytest
from fastrlhf.data.formats import (
    FormatError,
    JsonlAppender,
    Ranking,
    RankingLog,
    SFTExample,
    read_rankings,
    read_sft,
    write_rankings,
    write_sft,
)


def put(tmp_path, *lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


RANK = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}


def test_sft_round_trip_keeps_unicode_and_newlines(tmp_path):
    examples = [SFTExample("What is 2+2?", "4"), SFTExample("", "multi\nline — ünïcode \u2028 ok")]
    write_sft(tmp_path / "s.jsonl", examples)
    assert read_sft(tmp_path / "s.jsonl") == examples
    assert len((tmp_path / "s.jsonl").read_bytes().splitlines()) == 2  # one record per line


def test_rankings_round_trip_and_pairs_read_as_k2(tmp_path):
    path = put(
        tmp_path, json.dumps(RANK), "", json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"})
    )
    r3, r2 = read_rankings(path)  # the blank line is skipped
    assert r3 == Ranking("p", ("a", "b", "c"), (2, 0, 1))
    assert r2 == Ranking("q", ("good", "bad"), (0, 1))
    write_rankings(tmp_path / "out.jsonl", [r3, r2])
    assert read_rankings(tmp_path / "out.jsonl") == [r3, r2]  # pairs are written back as rankings


def test_ranking_pairs_are_all_better_worse_pairs():
    r = Ranking("p", ["a", "b", "c", "d"], [2, 0, 3, 1])
    assert r.k == 4
    assert r.pairs() == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]


def test_malformed_json_names_file_and_line(tmp_path):
    path = put(tmp_path, json.dumps(RANK), '{"prompt": "p", "responses": ["a", "b"]', json.dumps(RANK))
    with pytest.raises(FormatError, match=r"data\.jsonl:2: malformed JSON") as e:
        read_rankings(path)
    assert e.value.line == 2 and e.value.path.endswith("data.jsonl")


def test_not_an_object(tmp_path):
    with pytest.raises(FormatError, match=r":1: expected a JSON object; got list"):
        read_sft(put(tmp_path, "[1, 2]"))


def test_invalid_utf8(tmp_path):
    with pytest.raises(FormatError, match=r":2: not valid UTF-8"):
        read_sft(put(tmp_path, '{"prompt": "a", "response": "b"}', b'{"prompt": "\xff"}'))


def test_sft_missing_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: an SFT example is missing field 'response'"):
        read_sft(put(tmp_path, '{"prompt": "a"}'))


def test_sft_extra_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: unexpected field 'score' in an SFT example"):
        read_sft(put(tmp_path, '{"prompt": "a", "response": "b", "score": 1}'))


def test_sft_ill_typed_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: field 'response' must be str; got int"):
        read_sft(put(tmp_path, '{"prompt": "a", "response": 3}'))


def test_sft_empty_response(tmp_path):
    with pytest.raises(FormatError, match=r":2: response is empty"):
        read_sft(put(tmp_path, '{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "  \\n"}'))


def test_ranking_missing_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: a ranking is missing field 'ranking'"):
        read_rankings(put(tmp_path, '{"prompt": "a", "responses": ["x", "y"]}'))


def test_ranking_extra_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: unexpected field 'labeler' in a ranking"):
        read_rankings(put(tmp_path, json.dumps({**RANK, "labeler": "me"})))


def test_ranking_ill_typed_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: field 'responses' must be list; got str"):
        read_rankings(put(tmp_path, json.dumps({**RANK, "responses": "abc"})))


def test_ranking_response_not_a_string(tmp_path):
    with pytest.raises(FormatError, match=r":1: responses\[1\] must be a string; got int"):
        read_rankings(put(tmp_path, json.dumps({**RANK, "responses": ["a", 7, "c"]})))


@pytest.mark.parametrize("ranking", [[0, 0, 1], [0, 1], [0, 1, 3], [1, 2, 3]])
def test_ranking_not_a_permutation(tmp_path, ranking):
    with pytest.raises(FormatError, match=r":1: ranking must be a permutation of range\(3\)"):
        read_rankings(put(tmp_path, json.dumps({**RANK, "ranking": ranking})))


def test_ranking_of_non_integers(tmp_path):
    with pytest.raises(FormatError, match=r":1: ranking must be a list of integers; got \[True, False"):
        read_rankings(put(tmp_path, json.dumps({**RANK, "ranking": [True, False, 2]})))


@pytest.mark.parametrize("k", [0, 1])
def test_ranking_k_below_2(tmp_path, k):
    line = json.dumps({"prompt": "p", "responses": ["a"] * k, "ranking": list(range(k))})
    with pytest.raises(FormatError, match=rf":1: a ranking needs K >= 2 responses; got K = {k}"):
        read_rankings(put(tmp_path, line))


def test_ranking_empty_response(tmp_path):
    with pytest.raises(FormatError, match=r":1: responses\[2\] is empty"):
        read_rankings(put(tmp_path, json.dumps({**RANK, "responses": ["a", "b", ""]})))


def test_pair_empty_rejected(tmp_path):
    with pytest.raises(FormatError, match=r":1: rejected is empty"):
        read_rankings(put(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": " "}'))


def test_pair_missing_field(tmp_path):
    with pytest.raises(FormatError, match=r":1: a pair is missing field 'rejected'"):
        read_rankings(put(tmp_path, '{"prompt": "p", "chosen": "a"}'))


def test_dataclasses_check_their_fields():
    with pytest.raises(ValueError, match="permutation"):
        Ranking("p", ["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="K >= 2"):
        Ranking("p", ["a"], [0])
    with pytest.raises(ValueError, match="response is empty"):
        SFTExample("p", "")


def test_appender_appends_and_truncates(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlAppender(path) as out:
        assert out.append({"a": 1}) == 0
        second = out.append({"b": "é"})
        out.append({"c": 3})
        out.truncate(second)
    assert path.read_text() == '{"a": 1}\n'


def test_appender_ends_an_unterminated_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(RANK))  # written by hand, no final newline
    with RankingLog(path) as log:
        assert log.dropped_tail_bytes == 0 and len(log.records) == 1
        log.append(Ranking("q", ["x", "y"], [1, 0]))
    assert [r.prompt for r in read_rankings(path)] == ["p", "q"]


def test_ranking_log_drops_a_torn_tail_and_pops(tmp_path):
    path = tmp_path / "log.jsonl"
    torn = json.dumps(RANK)[:17]
    path.write_text(json.dumps(RANK) + "\n" + torn)  # a crash mid-write
    with RankingLog(path) as log:
        assert log.dropped_tail_bytes == len(torn) and len(log.records) == 1
        log.append(Ranking("q", ["x", "y"], [1, 0]))
        log.append(Ranking("r", ["x", "y"], [0, 1]))
        assert log.pop().prompt == "r"
    assert [r.prompt for r in read_rankings(path)] == ["p", "q"]
    with RankingLog(path) as log:  # reopened: sees exactly what is on disk
        assert [r.prompt for r in log.records] == ["p", "q"]
        log.pop(), log.pop()
        with pytest.raises(IndexError, match="no record to undo"):
            log.pop()
    assert path.read_bytes() == b""


def test_ranking_log_rejects_a_bad_middle_line(tmp_path):
    path = put(tmp_path, json.dumps(RANK), "{oops", json.dumps(RANK))
    with pytest.raises(FormatError, match=r":2: malformed JSON"):
        RankingLog(path)


def test_appended_records_survive_a_kill(tmp_path):
    """SIGKILL right after append() returns: every confirmed record is in the file."""
    path = tmp_path / "log.jsonl"
    code = (
        "import os, signal, sys\n"
        "from fastrlhf.data.formats import RankingLog, Ranking\n"
        f"log = RankingLog({str(path)!r})\n"
        "for i in range(5):\n"
        "    log.append(Ranking(f'p{i}', ['a', 'b'], [1, 0]))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr.decode()
    assert [r.prompt for r in read_rankings(path)] == [f"p{i}" for i in range(5)]
    assert os.path.getsize(path) == path.read_bytes().rfind(b"\n") + 1


def test_scores_mark_ties_and_round_trip(tmp_path):
    r = Ranking("p", ["a", "b", "c", "d"], [2, 0, 3, 1], [0.5, -1.0, 0.9, 0.5])
    assert r.pairs() == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]  # (0, 3) is a tie
    path = tmp_path / "r.jsonl"
    write_rankings(path, [r, Ranking("q", ["x", "y"], [1, 0])])
    assert read_rankings(path) == [r, Ranking("q", ["x", "y"], [1, 0])]


@pytest.mark.parametrize(
    "scores, match",
    [
        ([1.0, 0.0], "contradict the ranking"),
        ([1.0], "scores must be 2 numbers"),
        ([1.0, "x"], "scores must be 2 numbers"),
        ([1.0, float("nan")], "must be finite"),
    ],
)
def test_bad_scores_are_named(tmp_path, scores, match):
    with pytest.raises(ValueError, match=match):
        Ranking("p", ["a", "b"], [1, 0], scores)
    path = tmp_path / "r.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0], "scores": scores}) + "\n"
    )
    with pytest.raises(FormatError, match=r"r.jsonl:1: .*" + match):
        read_rankings(path)
