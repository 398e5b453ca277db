"""Work before the key (issue 24, finding 3), on the real app builders without Ray: the
key is checked before a byte of the body is read (FastAPI reads and parses the whole
body before any dependency runs), a body past its route's limit is a 413, and a request
without a key never takes a pipeline's admission place."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from deployments.catalog import CATALOG as PLATFORM
from pipelines.rag.models import MAX_REQUEST_CHARS, IngestRequest
from servegraph import Pipeline
from servegraph.security.endpoints import KeyBeforeBody, UsageMiddleware
from servegraph.security.guard import Guard
from servegraph.security.keys import UNAUTHORIZED, AuthError, AuthSettings, KeyStore
from servegraph.security.limits import Limiter
from servegraph.serving.admission import AdmissionGate
from servegraph.serving.gateway import build_gateway
from servegraph.serving.http import BodyLimit
from servegraph.serving.ingress import build_fastapi
from servegraph.settings import AppSettings
from tests.servegraph import toy
from tests.servegraph.test_http_stream import ToyInvoker

HUGE = str(10_000_000)  # bytes a caller says it will send


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class Usage:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def record(
        self, key: str, status: int, tokens: object = None, usd: float = 0.0, tenant: str = ""
    ) -> None:
        self.seen.append((key, status))


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite3", cache_s=0)


@pytest.fixture
def guard(store: KeyStore) -> Iterator[Guard]:
    """This process's Guard, on its own store, an in-process limiter and usage record."""
    previous = Guard._here
    settings = AuthSettings(keys=store.path, cache_s=0)
    Guard._here = Guard(settings, Limiter(clock=Clock()), Usage())
    yield Guard._here
    Guard._here = previous


class Receive:
    """An ASGI `receive` that counts its calls: it sends `chunks`, then the body's end;
    or, `hold`ing, never answers (a body trickled so slowly that it never arrives)."""

    def __init__(self, *chunks: bytes, hold: bool = False) -> None:
        self.chunks = list(chunks)
        self.hold = hold
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.hold:
            await asyncio.Event().wait()
        body = self.chunks.pop(0) if self.chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(self.chunks)}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: FastAPI,
    path: str,
    receive: Receive,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> Answer:
    """One request straight through the app's ASGI interface."""
    sent: list[dict[str, Any]] = []
    raw = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        raw["authorization"] = f"Bearer {key}"

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in raw.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    start = sent[0]
    headers_out = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return Answer(start["status"], headers_out, body)


def client(app: FastAPI, key: str | None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app", headers=headers
    )


def echo(name: str, max_in_flight: int | None = None) -> Pipeline:
    p = Pipeline(name, input=toy.Text, output=toy.Echo, max_in_flight=max_in_flight)
    p.returns(p.call("echo", "flaky", "echo", text=p.input.text))
    return p


def ingress(*pipelines: Pipeline) -> tuple[FastAPI, toy.Flaky]:
    server = toy.Flaky(failures=0)
    graphs = {p.name: p.build() for p in pipelines}
    return build_fastapi(graphs, toy.CATALOG, ToyInvoker({"flaky": server})), server


def gateway() -> FastAPI:
    return build_gateway(PLATFORM["vector_index"], PLATFORM, invoke=None)


# ----------------------------------------------------------------- the key, first


@pytest.mark.parametrize(("surface", "path"), [("ingress", "/echo"), ("gateway", "/delete")])
async def test_without_a_valid_key_a_huge_body_is_refused_before_a_byte_is_read(
    guard: Guard, store: KeyStore, surface: str, path: str
) -> None:
    app = ingress(echo("echo"))[0] if surface == "ingress" else gateway()
    revoked = store.create("gone", ["admin"])
    store.revoke("gone")
    refused: list[Answer] = []
    for key, authorization in [
        (None, None),
        ("nonsense", None),
        ("sg_0123456789ab_" + "a" * 43, None),
        (revoked, None),
        (None, "Basic dXNlcjpwYXNz"),
        (None, "Bearer"),
    ]:
        headers = {"content-length": HUGE}
        if authorization:
            headers["authorization"] = authorization
        receive = Receive(b"{")
        answer = await call(app, path, receive, key=key, headers=headers)
        assert receive.calls == 0, f"the body was read for key={key!r} {authorization!r}"
        refused.append(answer)
    assert {a.status for a in refused} == {401}
    # The body the key's dependency answers, whichever it was: nothing tells them apart.
    assert {a.body for a in refused} == {
        json.dumps(
            {"error": "unauthorized", "detail": UNAUTHORIZED}, separators=(",", ":")
        ).encode()
    }
    assert all(a.headers["www-authenticate"].startswith("Bearer") for a in refused)
    # A valid key without the route's scope: 403 naming it, the body unread too.
    reader = store.create("reader", ["invoke:other"])
    receive = Receive(b"{")
    forbidden = await call(app, path, receive, key=reader, headers={"content-length": HUGE})
    assert forbidden.status == 403 and receive.calls == 0
    assert ("'admin'" if surface == "gateway" else "'invoke:echo'") in forbidden.json()["detail"]
    assert ("reader", 403) in guard.usage.seen
    # The open docs stay open; an unknown path is FastAPI's 404.
    async with client(app, None) as anonymous:
        assert (await anonymous.get("/docs")).status_code == 200
        assert (await anonymous.get("/openapi.json")).status_code == 200
        assert (await anonymous.post("/no-such-route", json={})).status_code == 404


async def test_a_valid_key_still_gets_its_scope_limits_and_answer(
    guard: Guard, store: KeyStore
) -> None:
    """After the door, the route's `require` runs as before: the answer, and the limits."""
    app, server = ingress(echo("echo"))
    key = store.create("one-a-second", ["invoke:echo"], requests_per_s=1)
    async with client(app, key) as c:
        first = await c.post("/echo", json={"text": "hi"})
        second = await c.post("/echo", json={"text": "hi"})
    assert first.status_code == 200 and first.json() == {"text": "hi"}
    assert second.status_code == 429 and server.attempts == 1


async def test_the_key_is_looked_up_once_per_request(
    guard: Guard, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The door's look-up serves the route's `require` too, for that same key only: a
    second look-up per request cost the busiest gateway about 5 % of its CPU."""
    app, _ = ingress(echo("echo"))
    key = store.create("caller", ["invoke:echo"])
    looked_up: list[str] = []
    verify = store.verify

    def counting(k: str) -> Any:
        looked_up.append(k)
        return verify(k)

    monkeypatch.setattr(guard.store, "verify", counting)
    async with client(app, key) as c:
        answers = [await c.post("/echo", json={"text": str(n)}) for n in range(3)]
    assert [a.status_code for a in answers] == [200] * 3 and looked_up == [key] * 3
    # A caller the door verified under one key is never reused for another.
    found = guard.authenticate(key, None)
    with pytest.raises(AuthError):
        await guard.check("sg_0123456789ab_" + "a" * 43, None, verified=(key, found))
    other = store.create("other", ["invoke:other"])
    with pytest.raises(AuthError):  # nor for a scope the caller lacks
        await guard.check(other, "invoke:echo", verified=(other, guard.authenticate(other, None)))


async def test_with_keys_turned_off_the_door_is_open(store: KeyStore) -> None:
    previous = Guard._here
    Guard._here = Guard(AuthSettings(keys=store.path, unsafe_disabled=True), Limiter(), Usage())
    try:
        async with client(ingress(echo("echo"))[0], None) as c:
            assert (await c.post("/echo", json={"text": "hi"})).status_code == 200
    finally:
        Guard._here = previous


# --------------------------------------------------------------- the body's size


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEGRAPH_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("SERVEGRAPH_MAX_BODY_BYTES_ROUTES", '{"/big": 5000}')


async def test_a_keyed_body_past_its_routes_limit_is_a_413_naming_it(
    guard: Guard, store: KeyStore, small_limits: None
) -> None:
    app, server = ingress(echo("echo"), echo("big"))
    key = store.create("writer", ["invoke:*"])
    # Declared too large: refused from the Content-Length, the body never read.
    receive = Receive(b"{")
    declared = await call(app, "/echo", receive, key=key, headers={"content-length": HUGE})
    assert declared.status == 413 and receive.calls == 0
    body = declared.json()
    assert set(body) == {"error", "node", "detail"} and body["error"] == "BodyTooLargeError"
    assert "1000 bytes" in body["detail"] and "SERVEGRAPH_MAX_BODY_BYTES" in body["detail"]
    async with client(app, key) as c:
        assert (await c.post("/echo", json={"text": "x" * 900})).status_code == 200
        too_big = await c.post("/echo", json={"text": "x" * 1000})
        assert too_big.status_code == 413 and "1000 bytes" in too_big.json()["detail"]
        # A route with its own limit, its stream route included.
        assert (await c.post("/big", json={"text": "x" * 4000})).status_code == 200
        for path in ("/big", "/big/stream"):
            answer = await c.post(path, json={"text": "x" * 5000})
            assert answer.status_code == 413 and "5000 bytes" in answer.json()["detail"]

        # Chunked (no Content-Length): counted as it arrives, refused once past.
        pulled = 0

        async def trickle() -> AsyncIterator[bytes]:
            nonlocal pulled
            yield b'{"text": "'
            for _ in range(100):
                pulled += 1
                yield b"x" * 300
            yield b'"}'

        chunked = await c.post("/echo", content=trickle())
        assert chunked.status_code == 413 and chunked.json()["error"] == "BodyTooLargeError"
        assert pulled <= 4  # 10 + 4 * 300 bytes pass 1000: the rest was never read
    assert server.attempts == 2  # the two that fitted
    documented = app.openapi()["paths"]["/echo"]["post"]["responses"]
    assert documented["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }


async def test_a_model_servers_gateway_bounds_bodies_too(
    guard: Guard, store: KeyStore, small_limits: None
) -> None:
    admin = store.create("admin", ["admin"])
    receive = Receive(b"{")
    answer = await call(gateway(), "/delete", receive, key=admin, headers={"content-length": HUGE})
    assert answer.status == 413 and receive.calls == 0


def test_the_largest_valid_ingest_request_fits_its_routes_default_limit() -> None:
    """16 MiB for rag_ingest: its 1,000,000 characters at the worst JSON escape (an emoji,
    12 bytes as json.dumps writes it), with the longest ids; 1 MiB elsewhere."""
    settings = AppSettings()
    assert settings.max_body_bytes == 2**20
    per_document = MAX_REQUEST_CHARS // 64
    body = {
        "documents": [
            {"id": f"{i:03d}" + "d" * 197, "text": "\U0001f600" * per_document, "metadata": {}}
            for i in range(64)
        ]
    }
    IngestRequest.model_validate(body)  # valid: as large as a request may be
    size = len(json.dumps(body).encode())
    limit = BodyLimit(None, settings.max_body_bytes, settings.max_body_bytes_routes)
    route = {"path": "/pipelines/rag_ingest", "root_path": "/pipelines"}
    assert size > 12 * MAX_REQUEST_CHARS and size <= limit.limit_of(route) == 16 * 2**20
    for path, root, expected in [
        ("/pipelines/rag_ingest/stream", "/pipelines", 16 * 2**20),
        ("/rag_ingest", "/pipelines", 16 * 2**20),  # a server that strips the mount point
        ("/pipelines/rag", "/pipelines", 2**20),
        ("/pipelines/rag_ingestion", "/pipelines", 2**20),
        ("/embedder/embed", "/embedder", 2**20),
    ]:
        assert limit.limit_of({"path": path, "root_path": root}) == expected, path


# ------------------------------------------------------------ admission, after


def layer(app: FastAPI, kind: type) -> Any:
    """The instance of middleware `kind` in the app's built stack."""
    current: Any = app.middleware_stack
    while current is not None and not isinstance(current, kind):
        current = getattr(current, "app", None)
    assert current is not None, kind
    return current


async def test_requests_without_a_key_take_no_admission_place(
    guard: Guard, store: KeyStore
) -> None:
    """Sixteen callers without a key, each announcing 10 MB and never sending it, at a
    pipeline that runs two at once: each is answered 401 at the door, and a keyed
    request is admitted. (Before, each held a place while its body was awaited, and the
    keyed request got 503.)"""
    app, server = ingress(echo("small", max_in_flight=2))
    bodies = [Receive(hold=True) for _ in range(16)]
    waiting = [
        asyncio.ensure_future(call(app, "/small", body, headers={"content-length": HUGE}))
        for body in bodies
    ]
    try:
        for _ in range(1_000):  # bounded: until each is answered, or stuck on its body
            if all(task.done() or body.calls for task, body in zip(waiting, bodies, strict=True)):
                break
            await asyncio.sleep(0.001)
        assert layer(app, AdmissionGate).in_flight == {"small": 0}
        async with client(app, store.create("caller", ["invoke:small"])) as c:
            admitted = await c.post("/small", json={"text": "hi"})
        assert admitted.status_code == 200 and server.attempts == 1
        assert all(task.done() and task.result().status == 401 for task in waiting)
        assert not any(body.calls for body in bodies)
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


def test_the_key_is_checked_first_then_the_size_then_admission() -> None:
    """Starlette runs the middleware added last first: `user_middleware` lists them
    outermost first."""
    app = ingress(echo("echo"))[0]
    assert [m.cls for m in app.user_middleware] == [
        KeyBeforeBody,
        BodyLimit,
        AdmissionGate,
        UsageMiddleware,
    ]
    assert [m.cls for m in gateway().user_middleware] == [
        KeyBeforeBody,
        BodyLimit,
        UsageMiddleware,
    ]
