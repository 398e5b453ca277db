"""One trace per request through every node and replica; metrics on Prometheus."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from tests._cluster import SPANS_DIR
from tests.otlp import OtlpReceiver, ingress_span
from tests.sse import sse_events

pytestmark = pytest.mark.integration


def spans_of(
    trace_id: str, expect: int, timeout_s: float = 30, until=lambda spans: True
) -> list[dict]:
    """Every exported span of `trace_id`, each tagged with the file (process) it came from;
    waits (bounded) until there are `expect` of them and `until(spans)` holds, since
    each process exports on its own schedule."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for path in Path(SPANS_DIR).glob("*"):
            for line in path.read_text().splitlines():
                if f'"0x{trace_id}"' in line:
                    span = json.loads(line)
                    span["_process"] = path.name
                    found.append(span)
        if (len(found) >= expect and until(found)) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def by_name(spans: list[dict]) -> dict[str, dict]:
    return {s["name"]: s for s in spans}


def children(spans: list[dict], parent: dict) -> list[dict]:
    return [s for s in spans if s["parent_id"] == parent["context"]["span_id"]]


def descendants(spans: list[dict], parent: dict) -> list[dict]:
    found, frontier = [], [parent]
    while frontier:
        kids = children(spans, frontier.pop())
        found += kids
        frontier += kids
    return found


MODEL_NODES = ("embed", "retrieve", "generate")


def remote_spans(spans: list[dict], node: str) -> list[dict]:
    """Spans under `node {node}` exported by another process (the model server's)."""
    parent = by_name(spans).get(f"node {node}")
    if parent is None:
        return []
    return [s for s in descendants(spans, parent) if s["_process"] != parent["_process"]]


def rag_trace(trace_id: str) -> list[dict]:
    """A RAG request's spans, checked to be one tree through every node and replica."""
    spans = spans_of(
        trace_id,
        expect=10,
        timeout_s=60,
        until=lambda found: all(remote_spans(found, node) for node in MODEL_NODES),
    )
    named = by_name(spans)
    nodes = ["embed", "retrieve", "prompt", "generate", "answer"]
    for node in nodes:
        assert f"node {node}" in named, sorted(named)
    assert {s["context"]["trace_id"] for s in spans} == {f"0x{trace_id}"}
    # Node spans share one parent: the ingress replica's span for this request.
    assert len({named[f"node {n}"]["parent_id"] for n in nodes}) == 1
    # Each model call continues in the model server's own process, under its node
    # (node -> Serve's route_to_replica -> the replica's replica_handle_request).
    for node in MODEL_NODES:
        assert remote_spans(spans, node), f"no replica span under node {node}"
    assert len({s["_process"] for s in spans}) >= 4  # proxy, ingress, embedder, index, llm
    return spans


@pytest.fixture(scope="module")
def client(pipelines: LocalCluster) -> httpx.Client:
    return httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=300)


def test_rag_request_is_one_trace_through_every_node_and_replica(client: httpx.Client) -> None:
    trace_id = secrets.token_hex(16)
    response = client.post(
        "/pipelines/rag",
        json={"question": "How do I reset my password?"},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-trace-id"] == trace_id  # the client's traceparent was joined
    usage = json.loads(response.headers["x-servegraph-usage"])
    assert usage["llm_output_tokens"] > 0 and set(usage["nodes_ms"]) >= {"embed", "generate"}

    spans = rag_trace(trace_id)
    named = by_name(spans)
    generate = named["node generate"]["attributes"]
    assert generate["gen_ai.request.model"] == "smollm2-135m-instruct"
    assert generate["gen_ai.usage.output_tokens"] > 0 and generate["gen_ai.usage.input_tokens"] > 0
    retrieval = [s for s in spans if "servegraph.retrieval.k" in s["attributes"]]
    assert retrieval and retrieval[0]["attributes"]["servegraph.retrieval.top_scores"]
    batched = [s for s in spans if "servegraph.batch.size" in s["attributes"]]
    assert batched and "servegraph.batch.queue_wait_ms" in batched[0]["attributes"]


def test_streamed_rag_response_stays_one_trace(client: httpx.Client) -> None:
    trace_id = secrets.token_hex(16)
    with client.stream(
        "POST",
        "/pipelines/rag/stream",
        json={"question": "How do I reset my password?"},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-trace-id"] == trace_id
        events = sse_events(response.read().decode())
    assert any(name == "chunk" for name, _ in events) and events[-1][0] == "result"
    # One tree, the LLM's streaming call too continuing in its replica under its node.
    named = by_name(rag_trace(trace_id))
    generate = named["node generate"]["attributes"]
    assert generate["servegraph.llm.stream"] is True
    assert generate["gen_ai.usage.output_tokens"] > 0


def test_rag_request_reaches_an_otlp_receiver_as_one_complete_tree(
    client: httpx.Client, otlp: OtlpReceiver
) -> None:
    """The issue's bar: a RAG request, exported over OTLP, arrives as the complete tree."""
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    response = client.post(
        "/pipelines/rag",
        json={"question": "Is return shipping free?"},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    assert response.status_code == 200, response.text
    replicas = {
        "embed": "replica_handle_request Embedder embed_one",
        "retrieve": "replica_handle_request VectorIndex search",
        "generate": "replica_handle_request LLMServer:smollm2-135m-instruct chat",
    }
    nodes = ["embed", "retrieve", "prompt", "generate", "answer"]
    wanted = {f"node {n}" for n in nodes} | set(replicas.values())

    def complete(spans: list[dict]) -> bool:
        named = {s["name"] for s in spans}
        names = {n.split(" PipelineIngress")[0] for n in named}
        return wanted <= names and any(n.startswith(ingress_span()) for n in named)

    spans = otlp.trace(trace_id, until=complete)
    assert complete(spans), sorted({s["name"] for s in spans})
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent"] not in ids]
    assert len(roots) == 1 and roots[0]["parent"] == client_span, roots  # one connected tree
    assert roots[0]["name"].startswith(ingress_span())
    by_id = {s["span_id"]: s for s in spans}

    def ancestors(span: dict) -> list[str]:
        names = []
        while span["parent"] in by_id:
            span = by_id[span["parent"]]
            names.append(span["name"])
        return names

    for node, replica in replicas.items():
        (served,) = [s for s in spans if s["name"] == replica]
        assert f"node {node}" in ancestors(served)
    assert {s["service"] for s in spans} == {"servegraph"}


def test_agent_request_trace_nests_switch_and_loop_nodes(client: httpx.Client) -> None:
    response = client.post(
        "/pipelines/triage", json={"text": "Where is my order 12345?", "email": "ana@example.com"}
    )
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-trace-id"]
    spans = spans_of(
        trace_id,
        expect=12,
        until=lambda found: any("servegraph.classifier.label" in s["attributes"] for s in found),
    )
    named = by_name(spans)
    assert {"node classify", "node route", "node work", "node finish"} <= set(named)
    classify_remote = [
        s
        for s in descendants(spans, named["node classify"])
        if s["_process"] != named["node classify"]["_process"]
    ]
    assert any(s["attributes"].get("servegraph.classifier.label") == "shipping" for s in spans), (
        "classifier label not recorded"
    )
    assert classify_remote
    route_case = named["node route/case[shipping]/assign"]
    assert route_case["parent_id"] == named["node route"]["context"]["span_id"]
    first_choice = named["node work/iter[0]/choose"]
    assert first_choice["parent_id"] == named["node work"]["context"]["span_id"]
    # The order look-up is a call to the records server: its replica's span is inside.
    find = named["node work/iter[0]/act/case[lookup_order]/find"]
    assert any(s["_process"] != find["_process"] for s in descendants(spans, find))


def test_failed_node_is_recorded_as_an_error_on_its_span(client: httpx.Client) -> None:
    response = client.post(
        "/pipelines/rag",
        json={"question": "Anything about refunds?"},
        headers={"x-request-timeout": "0.001"},
    )
    assert response.status_code == 504 and response.json()["node"]
    spans = spans_of(response.headers.get("x-trace-id", ""), expect=1, timeout_s=5)
    # A request refused before the first node ends without node spans; when one ran,
    # it carries the error.
    for span in spans:
        if span["name"].startswith("node "):
            assert span["status"]["status_code"] == "ERROR"


def test_pipeline_metrics_reach_the_prometheus_endpoint(
    client: httpx.Client, pipelines: LocalCluster
) -> None:
    # Produce every series first (an answer, and a node error: a deadline too short to
    # embed the question), then wait until Ray exports all of them: counters appear
    # only once incremented, and Ray exports on its own interval.
    assert client.post(
        "/pipelines/rag", json={"question": "How long does delivery take?"}
    ).is_success
    late = client.post(
        "/pipelines/rag",
        json={"question": "How long does delivery take?"},
        headers={"X-Request-Timeout": "0.01"},
    )
    assert late.status_code == 504, late.text
    # Every series the Grafana dashboard charts must be one Ray actually exports.
    dashboard = json.loads(
        (Path(__file__).parents[2] / "dashboards" / "servegraph-grafana.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    wanted = {m for e in exprs for m in re.findall(r"ray_servegraph_\w+", e)} | {
        "servegraph_pipeline_requests",
        "servegraph_node_latency_ms_bucket",
        "servegraph_llm_tokens",
        "servegraph_batch_size",
        'node="generate"',
        'pipeline="rag"',
    }
    deadline = time.monotonic() + 120
    missing = wanted
    while missing and time.monotonic() < deadline:
        text = httpx.get(pipelines.metrics_url, timeout=10).text
        missing = {series for series in wanted if series not in text}
        if missing:
            time.sleep(1)
    assert not missing, f"not exported by Ray within 120 s: {sorted(missing)}"
