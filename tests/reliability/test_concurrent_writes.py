"""Concurrent writers and readers on the vector index, through the ingest pipeline and
the index's own routes: no errors, and the final count is exact."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import httpx
import pytest

from benchmarks.traffic import callers
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers

pytestmark = pytest.mark.reliability

WRITERS, DOCS_EACH = 8, 30


def document(run: str, writer: int, n: int, version: int = 1) -> dict:
    # 1 to 3 paragraphs of ~250 characters; at chunk_chars=300 each is one chunk.
    paragraphs = 1 + (writer + n) % 3
    text = "\n\n".join(
        f"Version {version} of note {n} by writer {writer}, paragraph {p}. " * 4
        for p in range(paragraphs)
    )
    return {"id": f"{run}/w{writer}/d{n}", "text": text, "metadata": {"run": run}}


def test_concurrent_ingest_and_search_never_fail_and_the_count_is_exact(
    pipelines: LocalCluster,
) -> None:
    run = uuid.uuid4().hex[:8]
    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=60) as client:
        before = client.get("/index/stats").json()["count"]
        probe = client.post("/embedder/embed_one", json={"text": "a note by a writer"}).json()

    async def load() -> tuple[list, list]:
        stop = asyncio.Event()
        readers = asyncio.ensure_future(
            callers(
                pipelines.base_url,
                "/index/search",
                lambda c, i: {"vector": probe["vector"], "k": 5, "filter": {"run": run}},
                n=4,
                stop=stop,
                max_requests=5_000,
                max_seconds=240,
            )
        )
        # Each writer ingests its 30 documents, one request each, then re-ingests
        # them all as version 2: the count must not move on the second pass.
        writes = await callers(
            pipelines.base_url,
            "/pipelines/rag_ingest",
            lambda c, i: {
                "documents": [document(run, c, i % DOCS_EACH, 1 + i // DOCS_EACH)],
                "chunk_chars": 300,
            },
            n=WRITERS,
            stop=asyncio.Event(),
            max_requests=WRITERS * DOCS_EACH * 2,
            max_per_caller=DOCS_EACH * 2,
            max_seconds=240,
        )
        stop.set()
        return writes, await readers

    writes, reads = asyncio.run(load())
    assert len(writes) == WRITERS * DOCS_EACH * 2
    assert Counter(w.status for w in writes) == {200: len(writes)}, [
        w.body for w in writes if w.status != 200
    ][:3]
    assert reads and Counter(r.status for r in reads) == {200: len(reads)}, [
        r.body for r in reads if r.status != 200
    ][:3]
    chunks = sum(1 + (w + n) % 3 for w in range(WRITERS) for n in range(DOCS_EACH))
    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=60) as client:
        after = client.get("/index/stats").json()["count"]
        hits = client.post(
            "/index/search",
            json={"vector": probe["vector"], "k": 100, "filter": {"run": run}},
        ).json()["hits"]
    assert after - before == chunks
    assert hits and all(h["text"].startswith("Version 2") for h in hits)


def test_a_request_with_64_documents_of_5000_characters_ingests_in_one_call(
    pipelines: LocalCluster,
) -> None:
    run = uuid.uuid4().hex[:8]
    documents = [
        {
            "id": f"{run}/big/{n}",
            "text": "\n\n".join(
                f"Section {s} of manual {n}: how the warranty covers part {s}. " * 6
                for s in range(14)
            )[:5000],
            "metadata": {"run": run},
        }
        for n in range(64)
    ]
    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=600) as client:
        response = client.post("/pipelines/rag_ingest", json={"documents": documents})
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert len(body["documents"]) == 64 and body["chunks"] > 256  # past one embed call's old cap
