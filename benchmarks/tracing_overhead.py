"""Tracing's cost at p50: the same pipeline with tracing off and on, in one run.

    .venv/bin/python -m benchmarks.tracing_overhead

On Serve: a chain of 11 model-server calls (11 node spans, 11 route and 11 replica
spans, proxy and ingress per request) over HTTP, first on a cluster with tracing off,
then on one exporting over OTLP/HTTP to a receiver in this process, which also checks
that the last request arrived as one complete, connected tree. In-process: the same
chain with the node hook off and on (SDK provider, in-memory exporter).
"""

from __future__ import annotations

import asyncio
import os
import statistics

import httpx

from benchmarks.graph_overhead import LocalEcho, per_call
from benchmarks.trivial import CATALOG, chain
from servegraph.security.client import client_headers
from tests.otlp import OtlpReceiver

N, REQUESTS = 10, 300


def p50(fn, n: int) -> float:
    """Median ms per call, after 20 warm-up calls."""
    return per_call(fn, n, warmup=20) * 1000


def on_serve(receiver: OtlpReceiver | None) -> float:
    from servegraph.deploy.local_ray import local_cluster
    from servegraph.deploy.planner import plan_platform

    os.environ["OTEL_TRACES_EXPORTER"] = "otlp" if receiver else "none"
    if receiver:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
        os.environ["OTEL_EXPORTER_OTLP_HEADERS"] = f"x-collector-token={receiver.token}"
    with local_cluster(dashboard=False) as cluster:
        plan_platform(
            [chain(N, "call").build()], CATALOG, catalog_path="benchmarks.trivial:CATALOG"
        ).deploy()
        with httpx.Client(
            headers=client_headers(), base_url=cluster.base_url, timeout=30
        ) as client:

            def call() -> httpx.Response:
                response = client.post(f"/pipelines/call_chain_{N}", json={"value": 0})
                response.raise_for_status()
                return response

            median = p50(call, REQUESTS)
            if receiver:
                check_tree(receiver, call().headers["x-trace-id"])
            return median


def check_tree(receiver: OtlpReceiver, trace_id: str) -> None:
    """The last request's trace, as the OTLP receiver got it: complete and connected."""

    def count(spans: list[dict], prefix: str) -> int:
        return sum(s["name"].startswith(prefix) for s in spans)

    def roots(spans: list[dict]) -> list[dict]:
        ids = {s["span_id"] for s in spans}
        return [s for s in spans if s["parent"] not in ids]

    def complete(spans: list[dict]) -> bool:
        # Each process's exporter flushes on its own schedule: wait for all of them.
        return (
            count(spans, "node ") == N + 1
            and count(spans, "replica_handle_request Echo") == N + 1
            and count(spans, "replica_handle_request PipelineIngress") == 1
            and len(roots(spans)) == 1
        )

    spans = receiver.trace(trace_id, until=complete, timeout_s=60)
    root = roots(spans)[0]["name"] if roots(spans) else "-"
    print(
        f"OTLP receiver, trace {trace_id}: {len(spans)} spans, {count(spans, 'node ')} node "
        f"spans, {count(spans, 'replica_handle_request Echo')} Echo replica spans, "
        f"{len(roots(spans))} root ({root})",
        flush=True,
    )
    assert complete(spans), spans


def in_process(tracing: bool) -> float:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from servegraph import InProcessRuntime
    from servegraph.telemetry.tracing import node_hook

    if tracing and not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
    hook = node_hook("bench") if tracing else None
    runtime = InProcessRuntime(CATALOG, {"echo": LocalEcho()}, node_hook=hook)
    graph = chain(N, "call").build()
    loop = asyncio.new_event_loop()
    compiled = runtime.compile(graph)  # once, as the ingress does
    return p50(lambda: loop.run_until_complete(runtime.run(compiled, {"value": 0})), 2000)


def main() -> None:
    local_off, local_on = in_process(False), in_process(True)
    print(f"in-process p50 off {local_off:.3f} ms, on {local_on:.3f} ms", flush=True)
    # Alternated (off, on, off, on): a fresh cluster each time, so drift on this shared
    # machine does not land on one side only.
    rounds = []
    for _ in range(2):
        rounds.append((on_serve(None), on_serve(OtlpReceiver())))
        print(f"on Serve p50 off {rounds[-1][0]:.2f} ms, on {rounds[-1][1]:.2f} ms", flush=True)
    print("on Serve p50 per round (off, on):", [(round(a, 2), round(b, 2)) for a, b in rounds])
    serve_off = statistics.mean(a for a, _ in rounds)
    serve_on = statistics.mean(b for _, b in rounds)
    print(
        f"in-process {N + 1} call nodes: off {local_off:.3f} ms, on {local_on:.3f} ms, "
        f"overhead {local_on - local_off:+.3f} ms ({local_on / local_off:.2f}x)"
    )
    print(
        f"on Serve   {N + 1} call nodes: off {serve_off:.2f} ms, on {serve_on:.2f} ms, "
        f"overhead {serve_on - serve_off:+.2f} ms ({serve_on / serve_off:.2f}x)"
    )


if __name__ == "__main__":
    main()
