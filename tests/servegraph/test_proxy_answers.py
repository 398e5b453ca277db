"""The middleware Serve's proxy runs (`servegraph.serving.proxy_answers`): a request
whose replica died before answering gets a 502 naming it, with Retry-After, never the
bare 500 uvicorn gives an app that answered nothing; other answers pass untouched."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from servegraph.serving.proxy_answers import AnswerLostReplicas, proxy_middlewares


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
    assert [m.cls for m in proxy_middlewares()] == [AnswerLostReplicas]
