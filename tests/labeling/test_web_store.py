"""The web labeler's library parts without a server: answers file, per-labeler logs, assignment with
labels_per_prompt, submit/skip/undo with retries, resume, torn lines, the merged file, agreement."""

import json

import pytest
from fastrlhf.cli import main
from fastrlhf.data.formats import FormatError, Ranking, read_rankings
from fastrlhf.labeling.web.agreement import agreement, format_agreement
from fastrlhf.labeling.web.answers import AnswerItem, prompt_id, read_answers, write_answers
from fastrlhf.labeling.web.labels import Label, read_labels, read_labels_dir
from fastrlhf.labeling.web.store import LEASE_S, LabelStore, RequestError
from helpers.web import wait_for, write_answers_file


@pytest.fixture
def items(tmp_path):
    return read_answers(write_answers_file(tmp_path / "answers.jsonl", 4, k=3))


@pytest.fixture
def open_store(tmp_path, items):
    stores = []

    def make(n=1, **kw):
        stores.append(
            LabelStore(items, tmp_path / "labels", tmp_path / "rankings.jsonl", labels_per_prompt=n, **kw)
        )
        return stores[-1]

    yield make
    for s in stores:
        s.close()


def sid(i):
    return f"sid-{i:06d}"


def test_answers_file_roundtrip_stable_ids_and_errors(tmp_path):
    items = [AnswerItem(prompt_id("a?"), "a?", ("x", " y\n  z")), AnswerItem("own-id", "b?", ("1", "2", "3"))]
    write_answers(tmp_path / "a.jsonl", items)
    assert read_answers(tmp_path / "a.jsonl") == items
    assert prompt_id("a?") == prompt_id("a?") != prompt_id("a? ")
    (tmp_path / "b.jsonl").write_text('{"prompt": "a?", "responses": ["x", "y"]}\n')
    assert read_answers(tmp_path / "b.jsonl")[0].id == prompt_id("a?")  # the id defaults to the prompt's hash
    bad = {
        '{"prompt": "a", "responses": ["x", "y"]}\n\n{"prompt": "a", "responses": ["u", "v"]}\n': ":3: id",
        '{"prompt": "a", "responses": ["x"]}\n': ":1: a ranking needs K >= 2",
        '{"prompt": "a", "responses": ["x", "  "]}\n': r"responses\[1\] is empty",
        '{"prompt": "a", "responses": "xy"}\n': "expected a list field 'responses'",
        '{"prompt": "a", "responses": ["x", "y"]\n': ":1: malformed JSON",
    }
    for text, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(FormatError, match=message):
            read_answers(tmp_path / "bad.jsonl")


def test_submit_is_fsynced_to_the_labelers_log_and_a_retry_is_stored_once(open_store, items, tmp_path):
    store = open_store()
    first = store.next("ana")["item"]
    assert first == items[0].to_json()
    r = store.submit("ana", sid(1), first["id"], ranking=[2, 0, 1], flags=["harmful"])
    assert (
        r["saved"]
        and not r["duplicate"]
        and r["progress"] == {"done": 1, "total": 4, "filled": 1, "needed": 4}
    )
    again = store.submit("ana", sid(1), first["id"], ranking=[2, 0, 1], flags=["harmful"])
    assert again["duplicate"]
    lines = (tmp_path / "labels" / "ana.jsonl").read_text().splitlines()
    assert len(lines) == 1  # on disk before submit returned, and only once
    row = json.loads(lines[0])
    assert row["ranking"] == [2, 0, 1] and row["flags"] == ["harmful"] and row["prompt_id"] == first["id"]
    assert row["prompt"] == items[0].prompt and row["responses"] == list(items[0].responses)
    assert store.next("ana")["item"]["id"] == items[1].id


def test_bad_submissions_are_refused_with_a_status_and_a_message(open_store, items):
    store = open_store()
    pid = store.next("ana")["item"]["id"]
    cases = [
        (dict(name="ana", sid=sid(1), prompt_id=pid, ranking=[0, 0, 1]), 422, "permutation of 0..2"),
        (dict(name="ana", sid=sid(1), prompt_id=pid, ranking=[0, 1]), 422, "permutation"),
        (dict(name="ana", sid=sid(1), prompt_id=pid, ranking=[0, 1, True]), 422, "permutation"),
        (dict(name="ana", sid=sid(1), prompt_id="p-nope", ranking=[0, 1, 2]), 404, "unknown prompt_id"),
        (dict(name=None, sid=sid(1), prompt_id=pid, ranking=[0, 1, 2]), 400, "labeler must be a name"),
        (dict(name="../x", sid=sid(1), prompt_id=pid, ranking=[0, 1, 2]), 400, "labeler must be a name"),
        (dict(name="ana", sid="short", prompt_id=pid, ranking=[0, 1, 2]), 400, "sid must be"),
        (dict(name="ana", sid=sid(1), prompt_id=pid), 400, "either 'ranking'"),
        (dict(name="ana", sid=sid(1), prompt_id=pid, ranking=[0, 1, 2], skip=""), 400, "either 'ranking'"),
        (dict(name="ana", sid=sid(1), prompt_id=pid, skip="x" * 501), 400, "at most 500"),
        (
            dict(name="ana", sid=sid(1), prompt_id=pid, ranking=[0, 1, 2], flags=["rude"]),
            400,
            "flags must be",
        ),
    ]
    for kw, status, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            store.submit(kw.pop("name"), kw.pop("sid"), kw.pop("prompt_id"), **kw)
        assert e.value.status == status
    store.submit("ana", sid(2), pid, ranking=[0, 1, 2])
    with pytest.raises(RequestError, match="already labeled") as e:
        store.submit("ana", sid(3), pid, ranking=[1, 0, 2])
    assert e.value.status == 409


def test_undo_takes_back_the_last_label_and_shows_that_prompt_again(open_store, tmp_path):
    store = open_store()
    p0 = store.next("ana")["item"]["id"]
    store.submit("ana", sid(1), p0, ranking=[0, 1, 2])
    p1 = store.next("ana")["item"]["id"]
    store.submit("ana", sid(2), p1, skip="can't tell")
    assert store.next("ana")["last"] == {"sid": sid(2), "prompt_id": p1}
    with pytest.raises(RequestError, match="your last submission is") as e:
        store.undo("ana", sid(3), sid(1))  # a stale page: refused, nothing else undone
    assert e.value.status == 409
    assert store.undo("ana", sid(3), sid(2))["duplicate"] is False
    assert store.undo("ana", sid(3), sid(2))["duplicate"] is True  # a retried undo is applied once
    assert store.next("ana")["item"]["id"] == p1
    store.undo("ana", sid(4), sid(1))
    view = store.next("ana")
    assert view["item"]["id"] == p0 and view["last"] is None and view["progress"]["done"] == 0
    with pytest.raises(RequestError, match="nothing to undo"):
        store.undo("ana", sid(5), sid(1))
    store.submit("ana", sid(1), p0, ranking=[0, 1, 2])  # an undone sid is never stored again
    assert read_labels(tmp_path / "labels" / "ana.jsonl").labels == []
    store.submit("ana", sid(6), p0, ranking=[2, 1, 0])
    assert [x.ranking for x in read_labels(tmp_path / "labels" / "ana.jsonl").labels] == [(2, 1, 0)]


def test_each_prompt_goes_to_n_different_labelers_and_leases_expire(open_store, items):
    now = [0.0]
    store = open_store(n=2, clock=lambda: now[0])
    ids = [it.id for it in items]
    assert store.next("a")["item"]["id"] == ids[0]
    assert store.next("b")["item"]["id"] == ids[0]  # a's lease + b = 2 labelers
    assert store.next("c")["item"]["id"] == ids[1]
    assert store.next("a")["item"]["id"] == ids[0]  # a reload shows the same prompt
    with pytest.raises(RequestError, match="already has 2 labels"):
        store.submit("c", sid(1), ids[0], ranking=[0, 1, 2])  # held by a and b
    store.submit("a", sid(2), ids[0], ranking=[0, 1, 2])
    store.submit("b", sid(3), ids[0], ranking=[1, 0, 2])
    assert store.next("d")["item"]["id"] == ids[1]  # ids[0] is full; c holds one slot of ids[1]
    assert store.next("e")["item"]["id"] == ids[2]
    now[0] += LEASE_S + 1  # c and d walked away: their prompt is free again
    assert store.next("f")["item"]["id"] == ids[1]
    assert store.next("a")["progress"] == {"done": 1, "total": 4, "filled": 2, "needed": 8}


def test_a_skip_does_not_fill_a_slot(open_store, items):
    store = open_store(n=1)
    store.submit("a", sid(1), items[0].id, skip="")
    assert store.next("b")["item"]["id"] == items[0].id
    assert store.next("a")["item"]["id"] == items[1].id


def test_resume_after_restart_and_a_torn_last_line_is_dropped(open_store, items, tmp_path):
    store = open_store()
    store.submit("ana", sid(1), items[0].id, ranking=[0, 1, 2])
    store.submit("bob", sid(2), items[1].id, ranking=[2, 1, 0])
    store.close()
    log = tmp_path / "labels" / "ana.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"sid": "sid-000003", "labeler": "ana", "prompt_id": "p-')  # a write cut off by a kill
    store = open_store()
    assert store.dropped_tails == {"ana": len(b'{"sid": "sid-000003", "labeler": "ana", "prompt_id": "p-')}
    assert log.read_bytes().endswith(b"}\n") and len(log.read_text().splitlines()) == 1
    assert store.next("ana")["item"]["id"] == items[2].id  # nothing asked twice
    assert store.submit("ana", sid(1), items[0].id, ranking=[0, 1, 2])["duplicate"]  # sids survive a restart
    assert store.next("ana")["progress"]["filled"] == 2
    store.submit("ana", sid(4), items[2].id, ranking=[1, 2, 0])
    assert len(read_labels(log).labels) == 2


def test_merged_file_is_every_live_ranking_in_answers_order_and_rm_readable(open_store, items, tmp_path):
    store = open_store(n=2, merge_interval_s=0.05)
    out = tmp_path / "rankings.jsonl"
    store.submit("zed", sid(1), items[1].id, ranking=[1, 0, 2])
    store.submit("amy", sid(2), items[1].id, ranking=[0, 1, 2])
    store.submit("amy", sid(3), items[0].id, skip="")
    assert wait_for(lambda: len(read_rankings(out)) == 2)  # rewritten while the server runs
    store.submit("amy", sid(4), items[2].id, ranking=[2, 1, 0])
    store.close()
    it = {x.id: x for x in items}
    assert read_rankings(out) == [
        Ranking(it[items[1].id].prompt, items[1].responses, (0, 1, 2)),  # amy before zed
        Ranking(it[items[1].id].prompt, items[1].responses, (1, 0, 2)),
        Ranking(items[2].prompt, items[2].responses, (2, 1, 0)),
    ]


def test_an_existing_rankings_file_not_written_by_the_web_labeler_is_never_overwritten(tmp_path, items):
    out = tmp_path / "rankings.jsonl"
    out.write_text('{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}\n')
    with pytest.raises(ValueError, match="not written by the web labeler"):
        LabelStore(items, tmp_path / "rankings.labels", out)
    assert read_rankings(out) == [Ranking("p", ("a", "b"), (1, 0))]


def test_one_server_per_labels_folder(open_store):
    open_store()
    with pytest.raises(RuntimeError, match="another label server is using"):
        open_store()


def _label(who, pid, ranking, responses=("a", "b", "c"), flags=()):
    return Label(f"{who}-{pid}", who, pid, "q", tuple(responses), ranking, None if ranking else "", flags)


def test_agreement_is_the_fraction_of_answer_pairs_ordered_alike():
    labels = {
        "a": [
            _label("a", "p1", (0, 1, 2)),
            _label("a", "p2", (2, 1, 0), flags=("harmful",)),
            _label("a", "p3", None),
        ],
        "b": [_label("b", "p1", (0, 1, 2)), _label("b", "p2", (2, 0, 1))],  # p2: 2 of 3 pairs alike
        "c": [_label("c", "p1", (2, 1, 0)), _label("c", "p2", (2, 1, 0), responses=("x", "y", "z"))],
    }
    ag = agreement(labels)
    assert ag.counts["a"] == {"ranked": 2, "skipped": 1, "flagged": 1}
    assert ag.pairs[("a", "b")] == (2, 5, 6)
    assert ag.pairs[("a", "c")] == (1, 0, 3)  # p2 was resampled for c: other answers, not compared
    assert ag.pairs[("b", "c")] == (1, 0, 3)
    assert ag.labeler_agreement("a") == (5, 9) and ag.overall() == (5, 12)
    text = format_agreement(ag)
    assert "a - b" in text and "0.833 (6)" in text and "0.417 of 12 answer pairs" in text


def test_label_agreement_command(tmp_path, capsys, open_store, items):
    store = open_store(n=2)
    for who, ranking in (("ana", [0, 1, 2]), ("bob", [0, 2, 1])):
        store.submit(who, sid(len(who) + ranking[1]), items[0].id, ranking=ranking)
    store.close()
    assert set(read_labels_dir(tmp_path / "labels")) == {"ana", "bob"}
    assert main(["label-agreement", str(tmp_path / "labels")]) == 0
    assert "ana - bob" in capsys.readouterr().out
    assert main(["label-agreement", str(tmp_path / "labels"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["pairs"][0]["agreement"] == pytest.approx(2 / 3) and report["labelers"]["bob"]["ranked"] == 1
    )
    assert main(["label-agreement", str(tmp_path / "nowhere")]) == 2
