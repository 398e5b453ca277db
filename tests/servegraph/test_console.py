"""The console without Ray: every pipeline's graph drawn node for node and edge for edge
(read back from the SVG the page shows), the ring of recent requests and the figures
drawn from it, its API behind the keys under many requests at once, and the waterfall
of a request with a retry and a fallback against the spans of its trace."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from deployments.catalog import CATALOG
from servegraph import Pipeline
from servegraph.console.drawing import OUTPUT, svg
from servegraph.console.recent import RecentRequests, drawn_name, figures
from servegraph.console.servers import ModelServers, scale_events
from servegraph.engine.runtime import InProcessServers, NodeRecord
from servegraph.lang.discovery import discover
from servegraph.lang.graph import INPUT, Graph, LoopNode
from servegraph.security.guard import Guard
from servegraph.security.keys import KeyStore
from servegraph.serving.ingress import build_fastapi
from servegraph.telemetry import tracing
from tests.auth_fakes import asgi_client as client

PIPELINES = discover("pipelines")
SVG = "{http://www.w3.org/2000/svg}"


# --------------------------------------------------------------------------- drawing


def expected(graph: Graph, prefix: str = "") -> tuple[set[str], set[tuple[str, str]]]:
    """The nodes and edges a drawing of `graph` must have, from the graph itself: every
    node, an input and an output per (sub-)graph, an edge per dependency, one from a
    switch/parallel/loop node into each of its sub-graphs, one into the output from what
    it returns, and a loop's body back from its output to its input."""
    nodes = {f"{prefix}{INPUT}", f"{prefix}{OUTPUT}"}
    edges = {(f"{prefix}{r.split('.', 1)[0]}", f"{prefix}{OUTPUT}") for r in graph.returns_refs()}
    for node in graph.nodes:
        name = f"{prefix}{node.name}"
        nodes.add(name)
        edges |= {(f"{prefix}{dep}", name) for dep in node.dependencies()}
        for key, sub in node.children():
            inner = f"{name}/{key}/"
            sub_nodes, sub_edges = expected(sub, inner)
            nodes |= sub_nodes
            edges |= sub_edges | {(name, f"{inner}{INPUT}")}
            if isinstance(node, LoopNode):
                edges.add((f"{inner}{OUTPUT}", f"{inner}{INPUT}"))
    return nodes, edges


def drawn(picture: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The nodes and edges an SVG drawing shows, by their ids."""
    root = ET.fromstring(picture)
    groups = list(root.iter(f"{SVG}g"))

    def is_a(g: ET.Element, kind: str) -> bool:
        return kind in g.get("class", "").split()

    nodes = {g.get("id", "").removeprefix("node:") for g in groups if is_a(g, "node")}
    edges = set()
    for g in groups:
        if is_a(g, "edge"):
            a, b = g.get("id", "").removeprefix("edge:").split("->")
            edges.add((a, b))
    return nodes, edges


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_each_pipeline_is_drawn_node_for_node_and_edge_for_edge(name: str) -> None:
    graph = PIPELINES[name]
    nodes, edges = drawn(svg(graph))
    want_nodes, want_edges = expected(graph)
    assert nodes == want_nodes
    assert edges == want_edges


def test_triage_is_drawn_with_its_loop_and_its_switches() -> None:
    _, edges = drawn(svg(PIPELINES["triage"]))
    loops = [n for n, node in _walk(PIPELINES["triage"]) if isinstance(node, LoopNode)]
    assert loops, "triage has a loop"
    for loop in loops:  # the body's output goes back to its input
        assert (f"{loop}/body/{OUTPUT}", f"{loop}/body/{INPUT}") in edges
    switches = [n for n, node in _walk(PIPELINES["triage"]) if node.kind == "switch"]
    assert switches
    for switch in switches:
        cases = {b.split("/")[-2] for a, b in edges if a == switch and b.endswith(INPUT)}
        assert len(cases) >= 2, f"{switch} is drawn with {cases}"


def _walk(graph: Graph, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for node in graph.nodes:
        yield f"{prefix}{node.name}", node
        for key, sub in node.children():
            yield from _walk(sub, f"{prefix}{node.name}/{key}/")


def test_a_request_s_node_records_name_the_drawn_nodes() -> None:
    assert drawn_name("retrieve") == "retrieve"
    assert drawn_name("route/case[billing]/assign") == "route/billing/assign"
    assert drawn_name("work/iter[3]/act/case[lookup]/run") == "work/body/act/lookup/run"
    assert drawn_name("fan/branch[web]/get") == "fan/web/get"
    assert drawn_name("route/default/assign") == "route/default/assign"
    # Every node a triage run can record is a drawn node.
    nodes, _ = drawn(svg(PIPELINES["triage"]))
    for name, _node in _walk(PIPELINES["triage"]):
        assert drawn_name(name) in nodes


# --------------------------------------------------------------------------- the ring


def record(node: str, status: str, wall_ms: float, attempt: int = 1) -> NodeRecord:
    return NodeRecord(node, "function", attempt, status, wall_ms, start_ms=1.0)


def test_the_ring_keeps_the_newest_and_figures_count_only_the_window() -> None:
    ring = RecentRequests(size=10)
    ring.started = 900.0  # the replica's start, on this test's clock
    for n in range(25):
        ring.add(
            "p",
            "v1",
            200 if n % 5 else 504,
            arrived=1000.0 + n,
            total_ms=float(n),
            key="app",
            tenant="default",
            records=[
                record("a", "timeout" if n % 5 == 0 else "ok", 2.0 * n),
                *([record("a", "fallback", 1.0)] if n % 5 == 0 else []),
            ],
        )
    kept = ring.latest("p")
    assert [r.total_ms for r in kept] == [float(n) for n in range(24, 14, -1)]
    window = ring.window("p", 5, now=1024.0)  # (1019, 1024]: the five arrived since
    assert [r.total_ms for r in window] == [20.0, 21.0, 22.0, 23.0, 24.0]
    got = figures(window, ring.covered(5, now=1024.0))
    assert got["covered_s"] == 5.0
    assert got["pipeline"]["count"] == 5
    assert got["pipeline"]["deadline_share"] == 0.2  # n=20 answered 504
    assert got["pipeline"]["p50_ms"] == 22.0 and got["pipeline"]["p99_ms"] == 24.0
    node = got["nodes"]["a"]
    # Its fallback is not an attempt: 5 attempts, one timed out, one fallback ran.
    assert node["count"] == 5 and node["error_share"] == 0.2 and node["fallback_share"] == 0.2
    assert node["rate_per_s"] == pytest.approx(1.0)
    # The ring is full: 60 s asked, but it holds only what arrived since its oldest (1015).
    assert ring.covered(60, now=1024.0) == pytest.approx(9.0)


# --------------------------------------------------------------------------- the API


class Ask(BaseModel):
    text: str
    n: int = 0


_FIRST_TRIES: set[str] = set()


def shaky(text: str) -> str:
    """Fails its first attempt for each text, then answers."""
    if text not in _FIRST_TRIES:
        _FIRST_TRIES.add(text)
        raise RuntimeError("a first attempt fails")
    return text.upper()


def broken(text: str) -> str:
    raise RuntimeError("always fails")


def spare(text: str) -> str:
    return f"spare for {text}"


def joined(a: str, b: str) -> str:
    return f"{a} / {b}"


def echo(text: str) -> str:
    return text


def wobbly() -> Graph:
    p = Pipeline("wobbly", input=Ask, output=str)
    a = p.function("shaky", shaky, text=p.input.text, retries=1, idempotent=True)
    b = p.function("broken", broken, text=p.input.text, fallback=spare)
    p.returns(p.function("join", joined, a=a, b=b))
    return p.build()


def plain() -> Graph:
    p = Pipeline("plain", input=Ask, output=str)
    p.returns(p.function("echo", echo, text=p.input.text))
    return p.build()


async def test_the_console_api_under_many_requests_at_once(guard: Guard, store: KeyStore) -> None:
    _FIRST_TRIES.clear()
    app = build_fastapi({"wobbly": wobbly(), "plain": plain()}, CATALOG, InProcessServers({}))
    runner = store.create("runner", ["invoke:wobbly", "invoke:plain"])
    viewer = store.create("viewer", ["invoke:plain"])

    async with client(app, runner) as c:
        answers = await asyncio.gather(
            *(c.post("/wobbly", json={"text": f"q{n}"}) for n in range(40)),
            *(c.post("/plain", json={"text": f"q{n}"}) for n in range(40)),
        )
    assert [a.status_code for a in answers] == [200] * 80
    assert answers[0].json() == "Q0 / spare for q0"

    async with client(app) as anonymous:
        page = await anonymous.get("/console")
        assert page.status_code == 200 and "servegraph console" in page.text
        assert (await anonymous.get("/console/static/console.js")).status_code == 200
        assert (await anonymous.get("/console/api/pipelines")).status_code == 401

    async with client(app, viewer) as c:
        listed = (await c.get("/console/api/pipelines")).json()
        by_name = {p["name"]: p for p in listed["pipelines"]}
        assert by_name["plain"]["can_run"] and not by_name["wobbly"]["can_run"]
        assert by_name["wobbly"]["scope"] == "invoke:wobbly"
        assert by_name["wobbly"]["figures"]["count"] == 40
        # Figures are the viewer's to read; running is not.
        assert (await c.post("/wobbly", json={"text": "x"})).status_code == 403

        detail = (await c.get("/console/api/pipelines/wobbly")).json()
        nodes = detail["figures"]["nodes"]
        assert nodes["shaky"]["count"] == 80 and nodes["shaky"]["error_share"] == 0.5
        assert nodes["join"]["error_share"] == 0.0
        assert detail["input_schema"]["required"] == ["text"]
        assert len(detail["recent"]) == 40
        assert {r["key"] for r in detail["recent"]} == {"runner"}

        one = (await c.get(f"/console/api/requests/{detail['recent'][0]['id']}")).json()
        steps = [(a["node"], a["attempt"], a["status"]) for a in one["attempts"]]
        assert sorted(steps) == sorted(
            [
                ("shaky", 1, "error"),
                ("shaky", 2, "ok"),
                ("broken", 1, "error"),
                ("broken", 1, "fallback"),
                ("join", 1, "ok"),
            ]
        )
        for a in one["attempts"]:  # each inside the request (to the rounding's 0.01 ms)
            assert a["start_ms"] >= 0
            assert a["start_ms"] + a["wall_ms"] <= one["total_ms"] + 0.01
        missing = await c.get("/console/api/requests/nope")
        assert missing.status_code == 422 and "request_id" in missing.text

        svg_answer = await c.get("/console/api/pipelines/wobbly/graph.svg")
        assert svg_answer.headers["content-type"].startswith("image/svg+xml")
        assert drawn(svg_answer.text) == expected(wobbly())

        everything = " ".join(
            [
                (await c.get("/console/api/pipelines")).text,
                (await c.get("/console/api/pipelines/wobbly")).text,
                one.__repr__(),
            ]
        )
    for secret in (runner, viewer):  # key names only, never keys
        assert secret not in everything

    # Another tenant's key sees none of these requests, nor their figures; and theirs
    # are not the default tenant's to see.
    other = store.create("acme-ops", ["invoke:plain"], tenant="acme")
    async with client(app, other) as c:
        theirs = (await c.get("/console/api/pipelines/wobbly")).json()
        assert theirs["recent"] == [] and theirs["figures"]["pipeline"]["count"] == 0
        assert theirs["tenants"] == "acme"
        assert (await c.get(f"/console/api/requests/{one['id']}")).status_code == 422
        assert (await c.post("/plain", json={"text": "theirs"})).status_code == 200
        assert len((await c.get("/console/api/pipelines/plain")).json()["recent"]) == 1
    async with client(app, viewer) as c:
        assert len((await c.get("/console/api/pipelines/plain")).json()["recent"]) == 40


def test_the_page_needs_nothing_but_its_own_files() -> None:
    static = Path(tracing.__file__).parent.parent / "console" / "static"
    for file in static.iterdir():
        text = file.read_text()
        assert not re.search(r"https?://", text.replace("http://www.w3.org", "")), file.name


async def test_the_waterfall_shows_the_attempts_and_durations_its_trace_holds(
    guard: Guard, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")

    def node_hook(pipeline: str) -> Any:  # the platform's spans, on this test's tracer
        def hook(node: Any, qualified: str, attempt: int, role: str = "attempt") -> Any:
            return tracing._node_span(tracer, pipeline, node, qualified, attempt, role)

        return hook

    monkeypatch.setattr(tracing, "node_hook", node_hook)
    _FIRST_TRIES.clear()
    app = build_fastapi({"wobbly": wobbly()}, CATALOG, InProcessServers({}))
    key = store.create("runner", ["invoke:wobbly"])
    async with client(app, key) as c:
        assert (await c.post("/wobbly", json={"text": "traced"})).status_code == 200
        rows = (await c.get("/console/api/pipelines/wobbly")).json()["recent"]
        shown = (await c.get(f"/console/api/requests/{rows[0]['id']}")).json()["attempts"]

    traced = {}
    for span in spans.get_finished_spans():
        attributes = span.attributes or {}
        role = attributes["servegraph.node.role"]
        status = attributes.get("servegraph.node.outcome")  # "ok", or the exception's name
        step = (attributes["servegraph.node.name"], attributes["servegraph.node.attempt"], role)
        traced[step] = ((span.end_time or 0) - (span.start_time or 0)) / 1e6, status
    waterfall = {
        (a["node"], a["attempt"], "fallback" if a["status"] == "fallback" else "attempt"): a
        for a in shown
    }
    assert set(waterfall) == set(traced)  # the same attempts, retry and fallback included
    for step, attempt in waterfall.items():
        span_ms, outcome = traced[step]
        # The same interval measured twice (the span inside the record's): they differ
        # by the few statements between the two clocks.
        assert attempt["wall_ms"] == pytest.approx(span_ms, abs=2.0), step
        assert (outcome == "ok") == (attempt["status"] in ("ok", "fallback")), step


def test_scale_events_are_where_the_replica_series_changes() -> None:
    points = [[0.0, 1.0], [15.0, 1.0], [30.0, 3.0], [45.0, 3.0], [60.0, 2.0]]
    assert scale_events(points) == [
        {"at": 30.0, "from": 1.0, "to": 3.0},
        {"at": 60.0, "from": 3.0, "to": 2.0},
    ]
    assert scale_events([]) == []


async def test_without_prometheus_the_servers_answer_says_so() -> None:
    from servegraph.deploy.local_ray import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    answer = await ModelServers(url).get(900)
    assert answer["prometheus"]["available"] is False
    assert answer["prometheus"]["url"] == url and answer["prometheus"]["reason"]


class BatchedEmbedder:
    """The toy embedder behind the platform's dynamic batching, metered as a model
    server is: a call's response carries the batch it rode in."""

    def __init__(self) -> None:
        from servegraph.server import Batcher

        self._batches = Batcher(self._run, max_batch_size=8, wait_s=0.05, name="toy")

    async def _run(self, texts: list[str]) -> list[list[float]]:
        await asyncio.sleep(0.01)  # a forward pass: later arrivals queue meanwhile
        return [[float(len(t)), 0.0] for t in texts]

    async def embed(self, request: Any) -> Any:
        from tests.servegraph.toy import Vector

        return Vector(vector=await self._batches.one(request.text))


async def test_a_call_s_record_carries_the_batch_it_rode_in() -> None:
    from servegraph.cost.metering import Meter, metered
    from servegraph.engine.runtime import InProcessRuntime
    from tests.servegraph import toy

    embedder = metered(["embed"])(BatchedEmbedder)()
    embedder.__dict__["_servegraph_meter"] = Meter({"cpu": 1.0})  # a replica's, without Ray
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(embedder=embedder))
    graph = runtime.compile(toy.rag().build())
    results = await asyncio.gather(
        *(runtime.execute(graph, {"question": f"q{n}", "k": 1}) for n in range(12))
    )
    calls = [r.call for result in results for r in result.nodes if r.node == "embed"]
    assert len(calls) == 12 and all(c is not None for c in calls)
    sizes = sorted(c["batch_size"] for c in calls if c)
    assert max(sizes) > 1 and all(1 <= s <= 8 for s in sizes)  # merged, within the bound
    assert all(c["queue_wait_ms"] >= 0 for c in calls if c)
    # A call of a server that notes nothing has no such record.
    assert all(r.call is None for result in results for r in result.nodes if r.node != "embed")


async def test_the_console_s_bookkeeping_never_costs_a_request_its_answer(
    guard: Guard, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the ring broke")

    monkeypatch.setattr(RecentRequests, "add", broken)
    app = build_fastapi({"plain": plain()}, CATALOG, InProcessServers({}))
    key = store.create("runner", ["invoke:plain"])
    async with client(app, key) as c:
        answers = await asyncio.gather(*(c.post("/plain", json={"text": "x"}) for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5
        # Only the page's windows are taken (each has its cached history of the servers).
        odd = await c.get("/console/api/servers", params={"window_s": 61})
        assert odd.status_code == 422 and "window_s" in odd.text
    async with client(app) as anonymous:
        page = await anonymous.get("/console")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
