"""A model server's REST surface through its gateway, on FastAPI with stand-in replicas
(no Ray): calls run as one-node graphs, so a dead replica is retried, a full server is a
503 naming it, bad input a 422 naming the field, and nothing is a bare 500."""

from __future__ import annotations

import httpx
import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from servegraph import Catalog, InvalidInputError, MethodContract, ServerSpec
from servegraph.security.client import client_headers
from servegraph.serving.gateway import build_gateway, method_graph
from servegraph.serving.handles import ServeInvoker
from tests.servegraph import toy

SPEC = ServerSpec(
    "echoer",
    {"echo": MethodContract(toy.Text, toy.Echo, idempotent=True)},
    "x:y",
    "Echoer",
    "/echoer",
    reads={"info": ("describe", toy.Echo)},
)
CATALOG = Catalog([SPEC])


class Method:
    """A deployment-handle method stand-in: `.remote(...)` awaits `fn(...)`."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class Replica:
    """Dies on its first `dies` calls, refuses when `full`, rejects the text "bad"."""

    def __init__(self, dies: int = 0, full: bool = False) -> None:
        self.dies, self.full, self.calls = dies, full, 0

    async def _run(self, text: str) -> toy.Echo:
        self.calls += 1
        if self.full:
            raise BackPressureError(num_queued_requests=9, max_queued_requests=9)
        if self.calls <= self.dies:
            raise ActorDiedError()
        if text == "bad":
            raise InvalidInputError("text", "is bad", "send a good text")
        return toy.Echo(text=text)

    async def echo(self, request: toy.Text) -> toy.Echo:
        return await self._run(request.text)

    @property
    def describe(self) -> Method:
        return Method(lambda: self._run("about"))


def client(replica: Replica) -> httpx.AsyncClient:
    invoker = ServeInvoker(CATALOG)
    invoker._targets["echoer"] = replica
    app = build_gateway(SPEC, CATALOG, invoker)
    return httpx.AsyncClient(
        headers=client_headers(), transport=httpx.ASGITransport(app=app), base_url="http://gw"
    )


async def test_a_call_is_retried_past_a_dead_replica() -> None:
    replica = Replica(dies=2)
    async with client(replica) as gw:
        response = await gw.post("/echo", json={"text": "hi"})
    assert response.status_code == 200 and response.json() == {"text": "hi"}
    assert replica.calls == 3


async def test_a_full_server_is_a_503_naming_it_with_retry_after() -> None:
    async with client(Replica(full=True)) as gw:
        response = await gw.post("/echo", json={"text": "hi"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    body = response.json()
    assert body["node"] == "echo" and "'echoer'" in body["detail"]


async def test_bad_input_from_the_replica_is_a_422_naming_the_field() -> None:
    async with client(Replica()) as gw:
        replica_says = await gw.post("/echo", json={"text": "bad"})
        schema_says = await gw.post("/echo", json={"txt": "hi"})
    assert replica_says.status_code == 422
    assert replica_says.json()["detail"] == [
        {"field": "text", "error": "is bad", "fix": "send a good text"}
    ]
    assert schema_says.status_code == 422 and schema_says.json()["detail"][0]["field"] == "text"


async def test_reads_are_retried_and_a_lost_replica_is_a_503_not_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("servegraph.serving.handles._REPLICA_RETRY_BACKOFF_S", (0.001, 0.001))
    async with client(Replica(dies=1)) as gw:
        assert (await gw.get("/info")).json() == {"text": "about"}
    async with client(Replica(dies=10_000)) as gw:
        response = await gw.get("/info")
    assert response.status_code == 503 and response.json()["node"] == "echoer"


def test_a_method_is_a_one_node_graph_of_the_request_fields() -> None:
    graph = method_graph(SPEC, "echo")
    (node,) = graph.nodes
    assert (node.server, node.method, node.idempotent) == ("echoer", "echo", True)
    assert node.inputs == {"text": "input.text"}
