"""Tracing's cost at p50: the same pipelines with tracing off and on, in one run.

    .venv/bin/python -m benchmarks.tracing_overhead

On Serve, a chain of 10 model-server calls (the most spans per request of any shape
here: 11 node spans, 11 replica spans, proxy and ingress) over HTTP, with one cluster
started with tracing off and then one with tracing on (file exporter). In-process, the
same chain with the node hook off and on (SDK provider, in-memory exporter).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

import httpx

from benchmarks.graph_overhead import LocalEcho
from benchmarks.trivial import CATALOG, chain

N, REQUESTS = 10, 300


def p50(fn, n: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def on_serve(tracing: bool) -> float:
    from servegraph.compiler import compile_platform
    from servegraph.local import local_cluster

    os.environ["SERVEGRAPH_TRACING_EXPORTER"] = "file" if tracing else "none"
    os.environ["SERVEGRAPH_TRACING_FILE_DIR"] = tempfile.mkdtemp(prefix="spans-")
    with local_cluster(dashboard=False) as cluster:
        compile_platform(
            [chain(N, "call").build()], CATALOG, catalog_path="benchmarks.trivial:CATALOG"
        ).deploy()
        with httpx.Client(base_url=cluster.base_url, timeout=30) as client:

            def call() -> None:
                client.post(f"/pipelines/call_chain_{N}", json={"value": 0}).raise_for_status()

            return p50(call, REQUESTS)


def in_process(tracing: bool) -> float:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from servegraph import LocalRuntime
    from servegraph.tracing import node_hook

    if tracing and not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
    hook = node_hook("bench") if tracing else None
    runtime = LocalRuntime(CATALOG, {"echo": LocalEcho()}, node_hook=hook)
    graph = chain(N, "call").build()
    loop = asyncio.new_event_loop()
    return p50(lambda: loop.run_until_complete(runtime.run(graph, {"value": 0})), 2000)


def main() -> None:
    local_off, local_on = in_process(False), in_process(True)
    serve_off, serve_on = on_serve(False), on_serve(True)
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
