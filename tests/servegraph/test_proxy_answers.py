"""The middlewares Serve's proxy runs (`servegraph.serving.proxy_answers`): a request
whose replica died before answering gets a 502 naming it, with Retry-After, never the
bare 500 uvicorn gives an app that answered nothing; other answers pass untouched. And
the front door: a pipeline's requests past what the ingress admits are refused in the
proxy, at once, with the ingress's 503 + Retry-After."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from servegraph.security.client import client_headers
from servegraph.security.guard import Guard
from servegraph.serving.admission import PublishedLimits, pipeline_below
from servegraph.serving.proxy_answers import (
    AnswerLostReplicas,
    FrontDoor,
    _keyed,
    proxy_middlewares,
)


async def lost(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """What Serve's proxy does for a replica that died mid-request: returns, silent."""


async def crashed(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    raise RuntimeError("ActorDiedError")


async def stream(request):  # type: ignore[no-untyped-def]
    async def chunks():  # type: ignore[no-untyped-def]
        yield b"first"
        raise RuntimeError("the replica died mid-stream")

    return StreamingResponse(chunks())


def served(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=AnswerLostReplicas(app), raise_app_exceptions=True)
    return httpx.AsyncClient(transport=transport, base_url="http://proxy")


@pytest.mark.parametrize("app", [lost, crashed], ids=["returned", "raised"])
async def test_a_request_its_replica_never_answered_gets_a_502_naming_it(app) -> None:  # type: ignore[no-untyped-def]
    async with served(app) as client:
        answer = await client.post("/pipelines/refund", json={})
    assert answer.status_code == 502 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"] == "ReplicaLost" and "retry" in answer.json()["fix"]


async def test_answers_and_started_streams_pass_untouched() -> None:
    app = Starlette(
        routes=[
            Route("/ok", lambda r: PlainTextResponse("fine", 201)),
            Route("/stream", stream),
        ]
    )
    async with served(app) as client:
        ok = await client.get("/ok")
        assert (ok.status_code, ok.text) == (201, "fine")
        with pytest.raises(RuntimeError, match="mid-stream"):  # started: left as it is
            await client.get("/stream")
    assert [m.cls for m in proxy_middlewares()] == [AnswerLostReplicas, FrontDoor]


async def test_the_front_door_refuses_past_the_ingress_limit_before_the_proxy_works() -> None:
    entered, release = [], asyncio.Event()

    async def proxy(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        """Serve's proxy, holding every request until released."""
        entered.append(scope["path"])
        await release.wait()
        await PlainTextResponse("ran")(scope, receive, send)

    refused: list[str] = []
    door = FrontDoor(proxy, limits={"small": 1}, on_refused=refused.append, prefix="/pipelines")
    transport = httpx.ASGITransport(app=door)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        held = asyncio.ensure_future(client.post("/pipelines/small", json={}))
        for _ in range(1_000):  # bounded wait until it is inside the proxy
            if entered:
                break
            await asyncio.sleep(0.01)
        turned = await asyncio.gather(
            client.post("/pipelines/small", json={}, headers={"x-request-id": "mine-1"}),
            client.post("/pipelines/small/stream", json={}),
        )
        passed = asyncio.ensure_future(client.post("/pipelines/other", json={}))
        elsewhere = asyncio.ensure_future(client.post("/small", json={}))  # not the ingress
        graph = asyncio.ensure_future(client.get("/pipelines/small/graph"))
        gating = await client.get("/-/admission")
        for _ in range(1_000):
            if len(entered) == 4:
                break
            await asyncio.sleep(0.01)
        release.set()
        others = await asyncio.gather(held, passed, elsewhere, graph)
        again = await client.post("/pipelines/small", json={})  # the count came back down
    for answer in turned:
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["node"] == "(admission)" and "this proxy" in answer.json()["detail"]
    # Each refusal has a request id, as Serve's proxy gives every answer: the caller's own,
    # or a new one.
    assert turned[0].headers["x-request-id"] == "mine-1"
    assert len(turned[1].headers["x-request-id"]) == 36
    assert refused == ["small", "small"]
    assert gating.json() == {"gating": True}
    assert [a.status_code for a in [*others, again]] == [200] * 5
    assert entered.count("/pipelines/small") == 2  # the refused never reached the proxy


@pytest.mark.parametrize(
    ("prefix", "method", "path", "name"),
    [
        ("/pipelines", "POST", "/pipelines/rag", "rag"),
        ("/pipelines", "POST", "/pipelines/rag/stream", "rag"),
        ("/pipelines", "GET", "/pipelines/rag", None),
        ("/pipelines", "POST", "/pipelines/rag/runs", None),
        ("/pipelines", "POST", "/pipelinesx/rag", None),
        ("/pipelines", "POST", "/rag", None),
        ("", "POST", "/pipelines/rag", None),  # not published yet: nothing gated
    ],
)
def test_the_pipeline_a_request_to_the_proxy_runs(
    prefix: str, method: str, path: str, name: str | None
) -> None:
    assert pipeline_below(prefix, {"method": method, "path": path}) == name


def test_the_proxy_admits_what_the_live_ingress_replicas_published_in_all() -> None:
    """Each ingress replica publishes its own limits every few seconds; a proxy sums the
    entries it has seen change lately by its own clock, and forgets the long gone."""
    from servegraph.serving.admission import FORGET_S, STALE_S

    def entry(at: float, rag: int = 8) -> dict:
        return {
            "prefix": "/pipelines",
            "limits": {"rag": rag},
            "scopes": {"rag": "invoke:rag"},
            "at": at,
        }

    published = PublishedLimits()
    assert published.take({"a": entry(1.0), "b": entry(2.0)}, now=100.0) == []
    assert dict(published) == {"rag": 16} and published.prefix == "/pipelines"
    # b keeps publishing, a has stopped (its replica gone): a no longer counts
    published.take({"a": entry(1.0), "b": entry(7.0)}, now=100.0 + STALE_S / 2)
    published.take({"a": entry(1.0), "b": entry(12.0, rag=4)}, now=100.0 + STALE_S + 1)
    assert dict(published) == {"rag": 4} and published.scopes == {"rag": "invoke:rag"}
    # a's clock may read anything: only whether its entry changes matters here
    gone = published.take({"a": entry(1.0), "b": entry(-5.0)}, now=100.0 + FORGET_S + 1)
    assert gone == ["a"] and dict(published) == {"rag": 8}
    published.take({}, now=100.0 + FORGET_S + 2)  # none live: nothing gated
    assert not published and published.prefix == ""


def _bursting(events: list[str], limits: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    """A front door admitting one `small` request (or `limits`), and a way to send it
    one (`call(pipeline)`), the statuses it answers and the requests it passes to
    Serve's proxy noted in `events` ("proxied small")."""

    async def proxy(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        events.append(f"proxied {scope['path'].rsplit('/', 1)[-1]}")
        await PlainTextResponse("ran")(scope, receive, send)

    door = FrontDoor(proxy, limits=limits or {"small": 1}, prefix="/pipelines")

    async def call(pipeline: str = "small") -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                events.append(str(message["status"]))

        path = f"/pipelines/{pipeline}"
        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        await door(scope, receive, send)

    call.door = door  # type: ignore[attr-defined]
    return call


async def _one_a_turn(call, n: int, pipeline: str = "small") -> None:  # type: ignore[no-untyped-def]
    """`n` requests, one in each turn of the event loop (each refused, the place taken)."""
    for _ in range(n):
        await call(pipeline)
        await asyncio.sleep(0)


async def test_refusals_that_arrive_with_an_admitted_request_are_answered_before_it_runs() -> None:
    """Serve's proxy spends milliseconds on an admitted request and the front door a
    fraction of one on a refusal: in a burst, the refusals go first."""
    events: list[str] = []
    call = _bursting(events)
    await asyncio.gather(call(), call(), call())  # arrived in the same turn of the loop
    assert events == ["503", "503", "proxied small", "200"]


async def test_an_admitted_request_waits_while_a_burst_is_refused_over_several_turns() -> None:
    """A burst reaches the proxy over several turns of its event loop (accepted and
    read in batches): the admitted request is routed once a turn passes with no
    refusal, not interleaved with the burst's refusals."""
    events: list[str] = []
    call = _bursting(events)

    await asyncio.gather(call(), _one_a_turn(call, 5))
    assert events == ["503"] * 5 + ["proxied small", "200"]


async def test_an_admitted_request_yields_to_refusals_for_a_bounded_time(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Refusals that never stop (a flood that lasts) delay an admitted request by at
    most `REFUSALS_FIRST_S`; here 0, so it is routed while they go on."""
    from servegraph.serving import proxy_answers

    monkeypatch.setattr(proxy_answers, "REFUSALS_FIRST_S", 0.0)
    events: list[str] = []
    call = _bursting(events)

    await asyncio.gather(call(), _one_a_turn(call, 5))
    # Routed in the turn after the first refusal, while the burst went on.
    assert events[:3] == ["503", "proxied small", "200"], events


async def test_an_admitted_request_does_not_wait_in_a_flood_older_than_the_bound() -> None:
    """Refusals that have gone on for `FLOOD_FIRST_S` are lasting overload, not a
    burst: an admitted request arriving then is routed at once, its place not held
    idle while the flood goes on."""
    import time

    from servegraph.serving.proxy_answers import FLOOD_FIRST_S

    events: list[str] = []
    call = _bursting(events)
    flood = call.door.refusals["small"]
    flood.flood_since, flood.last_at = time.monotonic() - FLOOD_FIRST_S, time.monotonic()
    await asyncio.gather(call(), _one_a_turn(call, 5))
    assert events[:3] == ["503", "proxied small", "200"], events


async def test_another_pipelines_refusals_never_hold_an_admitted_request() -> None:
    events: list[str] = []
    call = _bursting(events, limits={"small": 1, "full": 0})
    await asyncio.gather(call("small"), _one_a_turn(call, 5, "full"))
    assert events[:3] == ["503", "proxied small", "200"], events


def test_the_front_door_counts_only_keys_the_ingress_would_admit() -> None:
    """A request without a valid key, or whose key lacks the pipeline's scope, passes
    uncounted (the ingress answers it 401 or 403): it holds none of the places."""
    published = PublishedLimits()
    scopes = {"rag": "invoke:rag", "secret": "admin"}
    table = {"prefix": "/pipelines", "limits": {"rag": 8, "secret": 8}, "scopes": scopes}
    published.take({"replica": table | {"at": 1.0}}, now=0.0)
    counts = _keyed(published, Guard.here())
    Guard.here().store.refresh()  # what the limits' reading thread does (`also`)

    def scope(authorization: str | None) -> dict:
        headers = [(b"authorization", authorization.encode())] if authorization else []
        return {"type": "http", "method": "POST", "path": "/pipelines/rag", "headers": headers}

    key = client_headers()["authorization"]
    assert counts(scope(key), "rag")
    assert not counts(scope(None), "rag")
    assert not counts(scope("Bearer sg_nothere_000000000000"), "rag")
    assert not counts(scope(key.replace("Bearer", "Basic")), "rag")
    assert not counts(scope(key), "unpublished")  # no scope known: the ingress decides
