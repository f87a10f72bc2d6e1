"""The web labeler's server as a real process on 127.0.0.1: the token, bad requests, retries, kill -9 in a
loop while a client submits, 20 concurrent labelers, and `label --labeler web` feeding the reward model."""

import http.client
import json
import random
import statistics
import threading
import time

import pytest
from fastrlhf.cli import main
from fastrlhf.data.formats import read_rankings
from fastrlhf.labeling.labelers import make_labeler
from fastrlhf.labeling.web.answers import read_answers
from fastrlhf.labeling.web.labels import read_labels, read_labels_dir
from fastrlhf.train.log import read_jsonl
from helpers.web import Server, write_answers_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("web_server")
    with Server(write_answers_file(d / "answers.jsonl", 6, k=3), d / "rankings.jsonl") as srv:
        srv.dir = d
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def test_every_request_needs_the_token_and_posts_need_it_in_a_header(server, client):
    c = client
    body = {"labeler": "tok", "sid": "tok-000001", "prompt_id": "p-x", "ranking": [0, 1, 2]}
    for method, path, where, payload in [
        ("GET", "/", None, None),
        ("GET", "/static/app.js", None, None),
        ("GET", "/api/next?labeler=tok", None, None),
        ("GET", "/nothing-here", None, None),
        ("POST", "/api/submit", None, body),
        ("POST", "/api/submit", "query", body),  # a link or a form can carry a query, not a header
        ("POST", "/api/undo", "query", {"labeler": "tok", "sid": "tok-000002", "target": "tok-000001"}),
    ]:
        status, reply = c.request(method, path, payload, token=where)
        assert status == 403 and "token" in reply["error"], (method, path, where)
    status, reply = c.request("GET", "/?token=" + "x" * len(server.token), token=None)
    assert status == 403
    status, page = c.request("GET", "/", token="query")
    assert status == 200 and b'<ol id="answers">' in page
    for name in ("app.js", "app.css"):
        status, _ = c.request("GET", f"/static/{name}", token="query")
        assert status == 200
    c.conn.request("GET", f"/?token={server.token}")
    r = c.conn.getresponse()
    r.read()
    assert "script-src 'self'" in r.getheader("content-security-policy")  # no inline script could run
    assert r.getheader("x-content-type-options") == "nosniff"
    assert c.request("GET", "/nothing-here", token="query")[0] == 404


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_running(server, client):
    c = client
    pid = c.next("bad")[1]["item"]["id"]
    good = {"labeler": "bad", "sid": "bad-000001", "prompt_id": pid, "ranking": [2, 0, 1]}
    cases = [
        ({**good, "ranking": [0, 0, 1]}, 422, "permutation"),
        ({**good, "ranking": "0 1 2"}, 422, "permutation"),
        ({**good, "prompt_id": "p-000000000000"}, 404, "unknown prompt_id"),
        ({k: v for k, v in good.items() if k != "labeler"}, 400, "labeler must be a name"),
        ({**good, "labeler": ""}, 400, "labeler must be a name"),
        ({k: v for k, v in good.items() if k != "sid"}, 400, "sid must be"),
        (b"{not json", 400, "JSON object"),
        (b"[1, 2]", 400, "JSON object; got list"),
        (json.dumps({**good, "skip": "x" * 70_000}).encode(), 413, "over 65536 bytes"),
    ]
    for body, status, message in cases:
        got, reply = c.request("POST", "/api/submit", body)
        assert (got, message in reply["error"]) == (status, True), (body[:80], reply)
    assert c.request("GET", "/api/submit")[0] == 405
    assert c.request("GET", "/api/next")[0] == 400  # no labeler
    undo = {"labeler": "bad", "sid": "bad-000009", "target": "x" * 8}
    assert c.request("POST", "/api/undo", undo)[0] == 409
    status, reply = c.request("POST", "/api/submit", good)  # still serving, and nothing bad was stored
    assert status == 200 and not reply["duplicate"] and reply["progress"]["done"] == 1
    assert len(read_labels(server.dir / "rankings.labels" / "bad.jsonl").labels) == 1


def test_a_retried_submission_or_undo_is_stored_once(server, client):
    c = client
    pid = c.next("retry")[1]["item"]["id"]
    sub = {
        "labeler": "retry",
        "sid": "retry-000001",
        "prompt_id": pid,
        "ranking": [1, 2, 0],
        "flags": ["harmful"],
    }
    replies = [c.request("POST", "/api/submit", sub)[1] for _ in range(3)]
    assert [r["duplicate"] for r in replies] == [False, True, True]
    undo = {"labeler": "retry", "sid": "retry-000002", "target": "retry-000001"}
    assert [c.request("POST", "/api/undo", undo)[1]["duplicate"] for _ in range(2)] == [False, True]
    log = server.dir / "rankings.labels" / "retry.jsonl"
    assert len(log.read_text().splitlines()) == 2  # one ranking, one undo
    assert read_labels(log).labels == [] and c.next("retry")[1]["item"]["id"] == pid


def test_kill_9_in_a_loop_loses_no_acknowledged_ranking(tmp_path, capsys):
    """A client submits as fast as it can while the server is killed with SIGKILL at random moments and
    restarted; a submission whose answer never came is sent again (same sid) after the restart."""
    answers = write_answers_file(tmp_path / "answers.jsonl", 2000, k=3)
    out, log = tmp_path / "rankings.jsonl", tmp_path / "rankings.labels" / "kim.jsonl"
    rng = random.Random(0)
    acked, unacked = {}, []  # sid -> prompt id; (sid, prompt id, ranking) sent, answer never came
    kills = resent = sent = 0
    end = time.monotonic() + 30  # 5 kills take ~15 s on an idle 2-core machine
    while kills < 5 and time.monotonic() < end:
        with Server(answers, out) as srv, srv.client(timeout=5) as c:
            killer = threading.Timer(rng.uniform(0.2, 0.6), srv.proc.kill)
            killer.start()
            try:
                while unacked:  # sent before the kill, answer lost: the same sid again
                    s, pid, ranking = unacked[-1]
                    assert c.submit("kim", s, pid, ranking=ranking)[0] == 200
                    acked[s], resent = pid, resent + 1
                    unacked.pop()
                while True:
                    item = c.next("kim")[1]["item"]
                    unacked.append((f"kim-{sent:06d}", item["id"], rng.sample(range(3), 3)))
                    sent += 1
                    status, reply = c.submit("kim", unacked[-1][0], item["id"], ranking=unacked[-1][2])
                    assert status == 200 and reply["saved"]
                    acked[unacked[-1][0]] = item["id"]
                    unacked.pop()
            except (OSError, http.client.HTTPException):
                pass  # killed under us
            finally:
                killer.cancel()
            assert srv.wait() == -9
        kills += 1
        data = log.read_bytes()
        assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines())  # no torn line
    with Server(answers, out) as srv, srv.client() as c:
        for s, pid, ranking in unacked:
            assert c.submit("kim", s, pid, ranking=ranking)[0] == 200
            acked[s] = pid
        assert srv.stop() == 0
    live = read_labels(log).labels
    lost = set(acked) - {x.sid for x in live}
    assert not lost and len(live) == len(acked) == len({x.prompt_id for x in live})  # none lost, none twice
    assert len(read_rankings(out)) == len(acked)
    assert kills >= 3 and len(acked) >= 3 * kills
    with capsys.disabled():
        print(
            f"\nkill loop: {kills} kills, {len(acked)} acknowledged rankings, {len(lost)} lost, {resent} resent"
        )


def test_twenty_labelers_submit_2000_rankings_none_lost_or_doubled(tmp_path, capsys):
    answers = write_answers_file(tmp_path / "answers.jsonl", 1000, k=4)
    with Server(answers, tmp_path / "r.jsonl", "--labels-per-prompt", 2) as srv:
        wall, latencies, retries = _twenty_labelers(srv)
        assert srv.stop() == 0
    labels = read_labels_dir(tmp_path / "r.labels")
    live = [x for xs in labels.values() for x in xs]
    assert len(labels) == 20 and len(live) == len(latencies) == 2000
    assert len({x.sid for x in live}) == 2000
    by_prompt = {}
    for x in live:
        by_prompt.setdefault(x.prompt_id, set()).add(x.labeler)
    assert len(by_prompt) == 1000 and all(len(who) == 2 for who in by_prompt.values())  # 2 labelers each
    assert len(read_rankings(tmp_path / "r.jsonl")) == 2000
    q = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(
            f"\nload: 20 labelers, 2000 rankings (+{retries} retries) in {wall:.1f} s; submission latency "
            f"p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
        )
    assert q[98] < 2.0


def _twenty_labelers(srv):
    """20 threads, each a labeler with its own keep-alive connection, until nothing is left (or 60 s);
    every 10th submission is sent twice (a retry). Returns (wall seconds, latencies, retries)."""
    latencies, errors, retries = [], [], [0]
    stop_at = time.monotonic() + 60

    def labeler(i):
        rng, name = random.Random(i), f"lab{i:02d}"
        with srv.client() as c:
            for n in range(2000):
                item = c.next(name)[1]["item"]
                if item is None or time.monotonic() > stop_at:
                    return
                sub = dict(sid=f"{name}-{n:05d}", prompt_id=item["id"], ranking=rng.sample(range(4), 4))
                t = time.perf_counter()
                status, reply = c.submit(name, **sub)
                latencies.append(time.perf_counter() - t)
                if (
                    status != 200
                    or reply["duplicate"]
                    or (n % 10 == 0 and not c.submit(name, **sub)[1]["duplicate"])
                ):
                    errors.append(f"{name}: {status} {reply}")
                    return
                retries[0] += n % 10 == 0

    def guarded(i):
        try:
            labeler(i)
        except Exception as e:  # noqa: BLE001 -- reported by the test, not lost in the thread
            errors.append(f"lab{i:02d}: {e!r}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    return time.perf_counter() - t0, latencies, retries[0]


def test_label_with_the_web_labeler_then_the_reward_model_trains_on_it(sft_run, tmp_path):
    out = tmp_path / "rankings.jsonl"
    argv = [
        "label",
        "--sft",
        sft_run,
        "--prompts",
        "arithmetic",
        "--limit",
        "5",
        "--k",
        "3",
        "--max-new-tokens",
        "6",
    ]
    argv += ["--labeler", "web", "--out", out, "--labels-per-prompt", "2"]
    with Server(argv=argv) as srv, srv.client() as c:
        items = read_answers(tmp_path / "rankings.answers.jsonl")
        assert len(items) >= 3 and all(len(it.responses) == 3 for it in items)
        lab = make_labeler("arithmetic")
        for n, name in enumerate(["ana", "bob"] * len(items)):
            item = c.next(name)[1]["item"]
            ranking = lab.rank(item["prompt"], item["responses"])
            assert c.submit(name, f"{name}-{n:06d}", item["id"], ranking=ranking)[0] == 200
        assert c.next("ana")[1]["item"] is None and c.next("cy")[1]["item"] is None  # 2 labels each
        assert srv.stop() == 0
    assert f"{2 * len(items)} rankings in {out}" in "".join(srv.lines)
    rankings = read_rankings(out)
    assert len(rankings) == 2 * len(items) and {r.prompt for r in rankings} == {it.prompt for it in items}
    rm = tmp_path / "rm"
    overrides = [f"train.sft={sft_run}", f"data.train={out}", f"train.out_dir={rm}", "train.device=cpu"]
    overrides += [
        "train.batch_size=2",
        "train.max_steps=2",
        "train.log_interval=1",
        "data.val_fraction=0.3",
        "data.demos=none",
    ]
    assert main(["rm", *overrides]) == 0
    assert [row["step"] for row in read_jsonl(rm / "log.jsonl") if "loss" in row][-1] == 2
