"""Issue 10's open-loop figures, side by side with their reference, in one run.

    .venv/bin/python -m benchmarks.speed

1. Raw: the embedder in this process on the chunks of CPython's pydoc topics (79
   documents), batched 64 at a time: the reference for ingest.
2. The monolith (`benchmarks.monolith`, one process, no Ray) under open-loop RAG traffic.
3. The platform (`make run`'s deployment on a fresh local Ray, its own index folder):
   the classifier at 50 requests/s with the LLM idle, then again while 8 RAG callers keep
   the LLM busy; RAG under the same open-loop traffic as the monolith; ingest of the pydoc
   topics, 4 documents per request from 4 callers.

The monolith and the platform run one after the other, never together: each has the
machine to itself. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks import report
from benchmarks.load import HEADER, UNCACHED, LoadResult, open_loop
from benchmarks.pipelines import QUESTIONS
from benchmarks.report import Figure
from pipelines.rag.ingest import chunk_documents
from pipelines.rag.models import Document
from servegraph.deploy.local_ray import free_port
from servegraph.security.client import client_headers

TICKETS = [
    "I was charged twice for my order, please refund one payment.",
    "My parcel has not moved in a week, where is it?",
    "I cannot log in after resetting my password.",
    "Does the Nimbus speaker work with Bluetooth 5?",
]
# RAG: at 0.5/s both contenders answer every request in 5-7 s here, at 2/s in 12-18 s
# (about 26 in flight). 4/s for 30 s keeps about 64 in flight, past what the LLM sustains
# on 2 cores, so queueing shows in p99 and goodput.
RAG_RATE, RAG_SECONDS, RAG_DEADLINE = 4.0, 30.0, 30.0
CLASSIFY_RATE, CLASSIFY_SECONDS = 50.0, 20.0
BUSY_RAG_CALLERS = 8
INGEST_DOCS_PER_REQUEST, INGEST_CALLERS = 4, 4


def rag_body(i: int) -> dict:
    return {"question": QUESTIONS[i % len(QUESTIONS)]}


def ticket_body(i: int) -> dict:
    return {"text": TICKETS[i % len(TICKETS)]}


def pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document(id=f"pydoc/{name}", text=text, metadata={"source": "pydoc"})
        for name, text in sorted(topics.items())
        if text.strip()
    ]


def raw_ingest(documents: list[Document]) -> float:
    """Chunks/s of the raw embedder on the same chunks, 64 per forward pass."""
    from deployments.embedder.model import SentenceEncoder

    texts = chunk_documents(documents, chunk_chars=600)["texts"]
    encoder = SentenceEncoder()
    encoder.encode(texts[:64])
    started = time.perf_counter()
    encoder.encode(texts)
    return len(texts) / (time.perf_counter() - started)


@contextlib.contextmanager
def running_monolith() -> Iterator[tuple[str, int]]:
    """`benchmarks.monolith` in a process of its own, answering: its base URL and pid;
    then stopped with every process it started."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.monolith", "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the monolith exited with {server.returncode}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the monolith did not come up in 600 s")
            time.sleep(1)
        yield base_url, server.pid
    finally:
        stop_tree(server)


def on_monolith() -> LoadResult:
    with running_monolith() as (base_url, _):
        httpx.post(f"{base_url}/rag", json=rag_body(0), timeout=120).raise_for_status()
        return asyncio.run(
            open_loop(
                base_url,
                "/rag",
                rag_body,
                rate_rps=RAG_RATE,
                seconds=RAG_SECONDS,
                deadline_s=RAG_DEADLINE,
                target="RAG, monolith",
            )
        )


def stop_tree(server: subprocess.Popen[bytes]) -> None:
    """Stop the monolith and every process it started (vLLM's engine runs in children):
    anything left behind would take CPU from the platform's measurements that follow."""
    import psutil

    children = psutil.Process(server.pid).children(recursive=True)
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=30)


async def classifier_by_handle(rate_rps: float, seconds: float) -> tuple[float, float]:
    """p50 and p99 (ms) of the classifier called by handle, as a pipeline calls it, at
    Poisson arrivals of `rate_rps`."""
    from ray import serve

    from benchmarks.load import percentile, poisson
    from deployments.classifier.contract import ClassifyRequest

    handle = serve.get_deployment_handle("Classifier", "classifier")
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        await handle.classify.remote(ClassifyRequest(**ticket_body(i)))
        latencies.append(time.perf_counter() - started)

    await poisson(one, rate_rps=rate_rps, seconds=seconds)
    return percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000


async def classifier_while_rag_busy(base_url: str) -> tuple[LoadResult, tuple[float, float]]:
    """The classifier at 50/s while 8 closed-loop RAG callers keep the LLM busy: over
    HTTP (its route), then by handle (as a pipeline calls it), the callers running
    throughout."""
    stop = asyncio.Event()

    async def rag_caller(client: httpx.AsyncClient, n: int) -> None:
        i = n
        while not stop.is_set():
            await client.post("/pipelines/rag", json=rag_body(i), headers=UNCACHED)
            i += BUSY_RAG_CALLERS

    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=120
    ) as client:
        busy = [asyncio.create_task(rag_caller(client, n)) for n in range(BUSY_RAG_CALLERS)]
        await asyncio.sleep(5)  # the LLM's running batch fills (not a test: no condition)
        try:
            over_http = await open_loop(
                base_url,
                "/classifier/classify",
                ticket_body,
                rate_rps=CLASSIFY_RATE,
                seconds=CLASSIFY_SECONDS,
                deadline_s=10,
                target="classifier @50/s, 8 RAG callers",
            )
            by_handle = await classifier_by_handle(CLASSIFY_RATE, CLASSIFY_SECONDS)
            return over_http, by_handle
        finally:
            stop.set()
            await asyncio.gather(*busy, return_exceptions=True)


async def ingest(base_url: str, documents: list[Document]) -> tuple[float, int]:
    """Chunks/s through POST /pipelines/rag_ingest, 4 documents per request, 4 callers."""
    groups = [
        documents[i : i + INGEST_DOCS_PER_REQUEST]
        for i in range(0, len(documents), INGEST_DOCS_PER_REQUEST)
    ]
    chunks = 0
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=600
    ) as client:

        async def caller() -> None:
            nonlocal chunks
            while groups:
                group = groups.pop()
                response = await client.post(
                    "/pipelines/rag_ingest",
                    json={"documents": [d.model_dump() for d in group]},
                    headers={"X-Request-Timeout": "600"},
                )
                response.raise_for_status()
                chunks += response.json()["chunks"]

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(INGEST_CALLERS)))
        return chunks / (time.perf_counter() - started), chunks


def on_platform(documents: list[Document]) -> dict[str, object]:
    from benchmarks.platform_up import serving_everything

    with serving_everything(dashboard=False) as cluster:
        base = cluster.base_url
        httpx.post(
            f"{base}/pipelines/rag", json=rag_body(0), timeout=120, headers=client_headers()
        ).raise_for_status()
        idle = asyncio.run(
            open_loop(
                base,
                "/classifier/classify",
                ticket_body,
                rate_rps=CLASSIFY_RATE,
                seconds=CLASSIFY_SECONDS,
                deadline_s=10,
                target="classifier @50/s, LLM idle",
            )
        )
        by_handle = asyncio.run(classifier_by_handle(CLASSIFY_RATE, CLASSIFY_SECONDS))
        print(f"classifier by handle @50/s, LLM idle: p50/p99 {by_handle} ms", flush=True)
        busy, busy_by_handle = asyncio.run(classifier_while_rag_busy(base))
        print(f"classifier by handle @50/s, 8 RAG callers: p50/p99 {busy_by_handle} ms", flush=True)
        rag = asyncio.run(
            open_loop(
                base,
                "/pipelines/rag",
                rag_body,
                rate_rps=RAG_RATE,
                seconds=RAG_SECONDS,
                deadline_s=RAG_DEADLINE,
                target="RAG, platform",
                headers=UNCACHED,
            )
        )
        chunks_per_s, chunks = asyncio.run(ingest(base, documents))
        return {
            "idle": idle,
            "by_handle": by_handle,
            "busy": busy,
            "busy_by_handle": busy_by_handle,
            "rag": rag,
            "ingest": chunks_per_s,
            "chunks": chunks,
        }


def main() -> None:
    documents = pydoc_documents()
    raw_chunks_per_s = raw_ingest(documents)
    print(f"raw embedder on pydoc chunks: {raw_chunks_per_s:.1f} chunks/s", flush=True)
    monolith = on_monolith()
    with tempfile.TemporaryDirectory(prefix="servegraph-speed-") as index:
        os.environ["SERVEGRAPH_INDEX_PATH"] = str(Path(index) / "index")
        served = on_platform(documents)
    results = [monolith, served["rag"], served["idle"], served["busy"]]
    print(HEADER)
    for result in results:
        assert isinstance(result, LoadResult)
        print(result.row())
    rag, idle, busy = served["rag"], served["idle"], served["busy"]
    assert isinstance(rag, LoadResult)
    assert isinstance(idle, LoadResult)
    assert isinstance(busy, LoadResult)
    ingest_rate, by_handle = served["ingest"], served["by_handle"]
    busy_by_handle = served["busy_by_handle"]
    assert isinstance(ingest_rate, float)
    assert isinstance(by_handle, tuple)
    assert isinstance(busy_by_handle, tuple)
    report.save(
        "speed",
        [
            Figure(
                f"ingest chunks/s ({served['chunks']} pydoc chunks), platform / raw",
                ingest_rate,
                raw_chunks_per_s,
                "chunks/s",
                ">= 0.7",
            ),
            Figure(
                f"RAG goodput at {RAG_RATE}/s open loop, platform / monolith",
                rag.goodput_rps,
                monolith.goodput_rps,
                "req/s",
                ">= 1",
            ),
            Figure(
                f"RAG p99 at {RAG_RATE}/s open loop, platform / monolith",
                rag.p99_ms,
                monolith.p99_ms,
                "ms",
                "<= 1",
                higher_is_better=False,
            ),
            Figure("classifier p99 at 50/s, LLM idle", idle.p99_ms, None, "ms", "< 100", False),
            Figure(
                "classifier p99 at 50/s by handle (as pipelines call it), LLM idle",
                by_handle[1],
                None,
                "ms",
                "< 100",
                False,
            ),
            Figure(
                "classifier p99 at 50/s by handle, 8 RAG callers keep the LLM busy",
                busy_by_handle[1],
                None,
                "ms",
                "< 100",
                False,
            ),
            Figure(
                "classifier p99 at 50/s over HTTP, 8 RAG callers keep the LLM busy",
                busy.p99_ms,
                None,
                "ms",
                "< 100",
                False,
            ),
        ],
    )


if __name__ == "__main__":
    main()
