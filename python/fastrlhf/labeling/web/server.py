"""The labeling web app: a Starlette app over a LabelStore, served by uvicorn (the `web` extra).

Routes (every one needs the token: 403 without it):
  GET  /                      the page (static/index.html)             token in the query (?token=...)
  GET  /static/<file>         its script and style sheet                token in the query
  GET  /api/next?labeler=N    the labeler's current prompt, progress     token in the X-Token header
  POST /api/submit            {labeler, sid, prompt_id, ranking | skip, flags}     X-Token header only
  POST /api/undo              {labeler, sid, target}                               X-Token header only
State-changing requests are POSTs whose token must come in a header, which a plain link or a form on
another site cannot send. Errors are JSON {"error": message} with a 4xx status; the page shows them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastrlhf.labeling.web.store import LabelStore, RequestError

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as e:  # a RuntimeError, so the command line prints it as one line
    raise RuntimeError(f"the web labeler needs the web extra: pip install 'fastrlhf[web]' ({e})") from e

__all__ = ["MAX_BODY", "label_in_browser", "make_app", "serve"]

MAX_BODY = 64 * 1024
"""bytes; a submission is a few hundred"""
_STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
# the page runs only its own script and style sheet: even if text got into the DOM as HTML, no inline
# script or event handler would run and nothing would load from elsewhere
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class TokenGate:
    """ASGI middleware: 403 unless the request carries the token (POSTs: in the X-Token header; GETs: in
    the header or the `token` query parameter); adds the security headers to every response."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        given = dict(scope["headers"]).get(b"x-token", b"").decode("latin-1")
        if not given and scope["method"] in ("GET", "HEAD"):
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            where = (
                "the X-Token header" if scope["method"] not in ("GET", "HEAD") else "?token=... of the URL"
            )
            response = JSONResponse(
                {"error": f"forbidden: the token printed with the URL must be in {where}"}, 403
            )
            return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def _static(name: str) -> bytes:
    return resources.files("fastrlhf.labeling.web").joinpath("static", name).read_bytes()


async def _json_body(request: Request) -> dict[str, Any]:
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise RequestError(413, f"request body over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body must be a JSON object ({e})") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"the body must be a JSON object; got {type(obj).__name__}")
    return obj


def make_app(store: LabelStore, token: str) -> TokenGate:
    """The ASGI app: the routes above behind the token gate."""
    page = _static("index.html").replace(b"__TOKEN__", token.encode())  # token is URL-safe base64
    static = {name: _static(name) for name in _STATIC}

    def errors(endpoint):
        async def wrapped(request: Request) -> Response:
            try:
                return JSONResponse(await endpoint(request))
            except RequestError as e:
                return JSONResponse({"error": str(e)}, e.status)

        return wrapped

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            return JSONResponse({"error": f"no such file {name!r:.60}"}, 404)
        return Response(static[name], media_type=f"{_STATIC[name]}; charset=utf-8")

    async def next_item(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(store.next, request.query_params.get("labeler"))

    async def submit(request: Request) -> dict[str, Any]:
        b = await _json_body(request)
        return await run_in_threadpool(
            lambda: store.submit(
                b.get("labeler"),
                b.get("sid"),
                b.get("prompt_id"),
                ranking=b.get("ranking"),
                skip=b.get("skip"),
                flags=b.get("flags", []),
            )
        )

    async def undo(request: Request) -> dict[str, Any]:
        b = await _json_body(request)
        return await run_in_threadpool(store.undo, b.get("labeler"), b.get("sid"), b.get("target"))

    routes = [
        Route("/", index),
        Route("/static/{name}", asset),
        Route("/api/next", errors(next_item)),
        Route("/api/submit", errors(submit), methods=["POST"]),
        Route("/api/undo", errors(undo), methods=["POST"]),
    ]
    return TokenGate(Starlette(routes=routes), token)


def _listen(host: str, port: int) -> socket.socket:
    # proto IPPROTO_TCP, not create_server's 0: asyncio sets TCP_NODELAY only on sockets that say TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(store: LabelStore, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
    """Serve until Ctrl-C / SIGTERM, then write the merged rankings file and close the store. Prints the
    URL (with the token) first; port 0 picks a free port."""
    import uvicorn

    token = token or secrets.token_urlsafe(18)
    server = uvicorn.Server(uvicorn.Config(make_app(store, token), log_level="warning", lifespan="off"))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: let both end as a
    # KeyboardInterrupt here (from the moment the URL is out), so the store is closed and the exit is 0
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    sock = None
    try:
        sock = _listen(host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"label at http://{shown}:{sock.getsockname()[1]}/?token={token}", flush=True)
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        store.close()
        if sock is not None:
            sock.close()


def label_in_browser(
    items: list,
    out: str | os.PathLike,
    *,
    labels_dir: str | os.PathLike | None = None,
    labels_per_prompt: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
) -> int:
    """Serve `items` (AnswerItems) for labeling until stopped; per-labeler files go to labels_dir (default:
    `out` with the suffix .labels), the merged rankings to `out`. Returns the rankings in `out`."""
    labels_dir = Path(labels_dir) if labels_dir else Path(out).with_suffix(".labels")
    store = LabelStore(items, labels_dir, out, labels_per_prompt=labels_per_prompt)
    for name, n in store.dropped_tails.items():
        print(
            f"dropped an incomplete last line ({n} bytes, never acknowledged) from {labels_dir / name}.jsonl"
        )
    print(
        f"{len(items)} prompts x {labels_per_prompt} labels; per-labeler files in {labels_dir}/, merged "
        f"rankings in {out}. Ctrl-C stops (resume by running the same command again).",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"listening on {host}: anyone who can reach it with the token can label (plain HTTP)")
    serve(store, host, port)
    n = len(store.rankings())
    print(f"{n} rankings in {out}")
    return n
