"""The ingress's SSE route, on FastAPI's test client (no Ray cluster): the wire format,
statuses before the stream begins, and errors after it has."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from servegraph import Pipeline
from servegraph.security.client import client_headers
from servegraph.serving.ingress import build_fastapi
from tests.servegraph import toy
from tests.sse import sse_events


class ToyInvoker:
    """What `ServeInvoker` does with handles, done with the toy objects."""

    def __init__(self, servers: dict[str, Any]) -> None:
        self.servers = servers

    async def __call__(self, server: str, method: str, request: BaseModel) -> Any:
        return await getattr(self.servers[server], method)(request)

    def stream(self, server: str, method: str, request: BaseModel) -> AsyncIterator[Any]:
        return getattr(self.servers[server], method)(request)


def flaky_first() -> Pipeline:
    p = Pipeline("flaky_first", input=toy.Text, output=str)
    echo = p.call("echo", "flaky", "echo", text=p.input.text)
    p.returns(p.function("shout", toy.shout, text=echo.text))
    return p


def breaks_midway() -> Pipeline:
    p = Pipeline("breaks_midway", input=toy.Text, output=str)
    draft = p.call("draft", "writer", "write", text=p.input.text, stream=True)
    p.returns(p.function("shout", toy.shout, text=draft.text))
    return p


@pytest.fixture
def client() -> TestClient:
    graphs = {g.name: g.build() for g in (toy.written(), flaky_first())}
    graphs["breaks_midway"] = breaks_midway().build()
    servers = toy.servers(writer=toy.Writer(), flaky=toy.Flaky(failures=1))
    app = build_fastapi(graphs, toy.CATALOG, ToyInvoker(servers))
    app.state.servers = servers  # so a test can make the writer fail

    return TestClient(app, headers=client_headers())


def test_stream_route_sends_chunks_nodes_usage_then_the_result(client: TestClient) -> None:
    response = client.post("/written/stream", json={"text": "one two"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    got = sse_events(response.text)
    assert [name for name, _ in got] == ["chunk", "chunk", "node", "node", "usage", "result"]
    assert [data["text"] for name, data in got if name == "chunk"] == ["one", " two"]
    assert got[2][1]["node"] == "draft" and got[2][1]["status"] == "ok"
    assert set(got[4][1]["nodes_ms"]) == {"draft", "shout"}
    assert got[-1][1] == "ONE TWO"
    # The plain route answers the same output.
    assert client.post("/written", json={"text": "one two"}).json() == "ONE TWO"


def test_a_run_failing_before_any_progress_gets_its_status_not_a_stream(
    client: TestClient,
) -> None:
    response = client.post("/flaky_first/stream", json={"text": "x"})
    assert response.status_code == 502
    assert response.json()["node"] == "echo"
    # Bad input is refused before anything runs, naming the field.
    response = client.post("/written/stream", json={"txt": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "text"


def test_a_failure_after_chunks_were_sent_is_an_error_event(client: TestClient) -> None:
    client.app.state.servers["writer"].fail_after = 1  # type: ignore[attr-defined]
    response = client.post("/breaks_midway/stream", json={"text": "one two three"})
    assert response.status_code == 200
    got = sse_events(response.text)
    assert [name for name, _ in got] == ["chunk", "node", "error"]
    assert got[-1][1]["status"] == 502 and got[-1][1]["node"] == "draft"
    assert "stream broke" in got[-1][1]["detail"]


def test_every_pipeline_documents_its_stream_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/written/stream"]["post"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert "`chunk`" in operation["description"]


def test_a_failure_to_record_metrics_never_changes_the_answer() -> None:
    class BrokenMetrics:
        def record(self, *args: Any) -> None:
            raise ValueError("value must be >0, got 0")  # what Ray's counter said once

    graphs = {"written": toy.written().build()}
    servers = toy.servers(writer=toy.Writer())
    app = build_fastapi(graphs, toy.CATALOG, ToyInvoker(servers), BrokenMetrics())
    client = TestClient(app, headers=client_headers())
    assert client.post("/written", json={"text": "one two"}).json() == "ONE TWO"
    streamed = client.post("/written/stream", json={"text": "one two"})
    assert [name for name, _ in sse_events(streamed.text)][-1] == "result"
