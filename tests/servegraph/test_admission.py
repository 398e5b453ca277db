"""The ingress's admission gate, on the real FastAPI app with toy servers (no Ray): a
pipeline past its `max_in_flight` is refused at once with 503 + Retry-After naming it,
other pipelines are not affected, and the count comes back down."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from servegraph import Pipeline
from servegraph.security.client import client_headers
from servegraph.serving.admission import pipeline_of
from servegraph.serving.ingress import build_fastapi
from tests.servegraph import toy
from tests.servegraph.test_http_stream import ToyInvoker


class Gate:
    """A server that holds every call until released."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = asyncio.Event()

    async def sleep(self, request: toy.Sleep) -> toy.Echo:
        self.entered += 1
        await self.release.wait()
        return toy.Echo(text="done")


def held(name: str, limit: int | None) -> Pipeline:
    p = Pipeline(name, input=toy.Sleep, output=toy.Echo, max_in_flight=limit)
    p.returns(p.call("hold", "flaky", "sleep", seconds=p.input.seconds))
    return p


async def test_past_its_limit_a_pipeline_is_refused_at_once_and_others_still_run() -> None:
    gate = Gate()
    graphs = {g.name: g for g in (held("small", 2).build(), held("other", None).build())}
    app = build_fastapi(graphs, toy.CATALOG, ToyInvoker({"flaky": gate}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        headers=client_headers(), transport=transport, base_url="http://ingress"
    ) as client:
        admitted = [
            asyncio.ensure_future(client.post("/small", json={"seconds": 1})) for _ in range(2)
        ]
        for _ in range(1_000):  # wait (bounded) until both are inside the server
            if gate.entered == 2:
                break
            await asyncio.sleep(0.01)
        assert gate.entered == 2
        refused = await asyncio.gather(
            client.post("/small", json={"seconds": 1}),
            client.post("/small/stream", json={"seconds": 1}),
        )
        for response in refused:
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            body = response.json()
            assert body["node"] == "(admission)" and "'small'" in body["detail"]
        other = asyncio.ensure_future(client.post("/other", json={"seconds": 1}))
        for _ in range(1_000):
            if gate.entered == 3:
                break
            await asyncio.sleep(0.01)
        assert gate.entered == 3  # another pipeline is admitted meanwhile
        gate.release.set()
        assert all(r.status_code == 200 for r in await asyncio.gather(*admitted, other))
        again = await client.post("/small", json={"seconds": 1})
        assert again.status_code == 200  # the count came back down
        assert (await client.get("/")).status_code == 200  # not a pipeline run: not gated


@pytest.mark.parametrize(
    ("method", "path", "root", "name"),
    [
        ("POST", "/rag", "", "rag"),
        ("POST", "/pipelines/rag/stream", "/pipelines", "rag"),
        ("POST", "/rag/stream", "/pipelines", "rag"),
        ("GET", "/rag/graph", "", None),
        ("POST", "/rag/graph/x", "", None),
        ("POST", "/", "", None),
    ],
)
def test_the_pipeline_a_request_runs(method: str, path: str, root: str, name: str | None) -> None:
    assert pipeline_of({"method": method, "path": path, "root_path": root}) == name
