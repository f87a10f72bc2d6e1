"""Shared by the web labeler tests: answers files made on the spot, and `label-server` run as a real process
on 127.0.0.1 with a small HTTP client (keep-alive, one connection per client thread)."""

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit


def write_answers_file(path, n, k=4, extra=()):
    """n arithmetic prompts with k made-up answers each (+ extra (prompt, responses) items first)."""
    rows = [{"prompt": p, "responses": list(r)} for p, r in extra]
    rows += [
        {"prompt": f"What is {i}+{i + 1}?", "responses": [str(2 * i + 1 + d) for d in range(k)]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Server:
    """`python -m fastrlhf label-server --answers A --out O ...` (or any command given as argv) in a child
    process; .url, .port, .token once it listens."""

    def __init__(self, answers=None, out=None, *extra, argv=None, timeout=60.0):
        argv = argv or ["label-server", "--answers", answers, "--out", out, *extra]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrlhf", *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines, self._ready = [], threading.Event()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        if not self._ready.wait(timeout):
            self.proc.kill()
            raise RuntimeError("label-server did not print its URL:\n" + "".join(self.lines))
        found = re.search(r"(http://\S+)", "".join(self.lines))
        if found is None:  # the process ended without a URL (an error)
            raise RuntimeError("label-server failed:\n" + "".join(self.lines))
        self.url = found.group(1)
        parts = urlsplit(self.url)
        self.port, self.token = parts.port, parts.query.removeprefix("token=")

    def _drain(self):
        for line in self.proc.stdout:  # read everything, so the child never blocks on a full pipe
            self.lines.append(line)
            if "label at http://" in line:
                self._ready.set()
        self._ready.set()

    def client(self, timeout=10.0):
        return Client(self.port, self.token, timeout)

    def stop(self):
        """Ctrl-C's path (SIGTERM): uvicorn stops and the merged file is written in full."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait()

    def wait(self):
        """The exit status, once the process has ended (-9 when killed)."""
        rc = self.proc.wait(30)
        self._drainer.join(10)
        self.proc.stdout.close()
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


class Client:
    def __init__(self, port, token, timeout=10.0):
        self.token = token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, token="header"):
        """(status, JSON reply); token="header" | "query" | None says where the token goes."""
        hdrs = {"X-Token": self.token} if token == "header" else {}
        if token == "query":
            path += ("&" if "?" in path else "?") + f"token={self.token}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
        r = self.conn.getresponse()
        raw = r.read()
        return r.status, (
            json.loads(raw) if r.getheader("content-type", "").startswith("application/json") else raw
        )

    def next(self, labeler):
        return self.request("GET", f"/api/next?labeler={labeler}")

    def submit(self, labeler, sid, prompt_id, **fields):
        return self.request(
            "POST", "/api/submit", {"labeler": labeler, "sid": sid, "prompt_id": prompt_id, **fields}
        )

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_for(cond, timeout=10.0, every=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return cond()
