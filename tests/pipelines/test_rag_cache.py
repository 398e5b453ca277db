"""`rag`'s answer cache through the pipeline ingress, no Ray: the real FastAPI app,
runtime and vector index (with the answer cache in it), a bag-of-words embedder and a
scripted LLM that counts its calls. A repeated question is answered without the LLM and
says so; its tenant, its other fields and the caller's Cache-Control decide; a write to
a document the answer was built from makes the next one new; a new ingress finds the
answers the index kept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.catalog import CATALOG
from deployments.vector_index.model import VectorIndex
from pipelines.rag.ingest import knowledge_base
from servegraph.engine.runtime import InProcessServers
from servegraph.lang.discovery import discover
from servegraph.security.keys import KeyStore
from servegraph.serving.ingress import build_fastapi
from tests.auth_fakes import guard_on
from tests.pipelines.test_rag_graph import ScriptedLLM, WordEmbedder
from tests.sse import sse_events

QUESTION = {"question": "How long do refunds take after a return?"}


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[dict[str, str]]:
    store = KeyStore(tmp_path / "keys.sqlite3", cache_s=0)
    scopes = ["invoke:rag", "write:rag_ingest"]
    with guard_on(store.path):
        yield {t: store.create(f"{t}-app", scopes, tenant=t) for t in ("acme", "globex")}


@pytest.fixture
def servers(tmp_path: Path) -> dict[str, Any]:
    return {
        "embedder": WordEmbedder(),
        "vector_index": VectorIndex(tmp_path / "index"),
        "llm": ScriptedLLM(
            {"answer": "Refunds are issued within 7 business days.", "sources": [1]}
        ),
    }


def platform(servers: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SERVEGRAPH_ANSWER_CACHE_TENANTS", '["*"]')
    every = discover("pipelines")
    graphs = {name: every[name] for name in ("rag", "rag_ingest")}
    invoker = InProcessServers(servers)
    app = build_fastapi(graphs, CATALOG, invoker)
    return app


def client(app: Any, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://app",
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


async def ingest(c: httpx.AsyncClient, documents: list[dict]) -> None:
    answer = await c.post("/rag_ingest", json={"documents": documents})
    assert answer.status_code == 200, answer.text


async def kept(index: VectorIndex, n: int) -> None:
    """Wait until the cache holds `n` answers (they are kept after the reply)."""
    for _ in range(500):
        if len(index._store.answers) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(index._store.answers)} answers kept, not {n}")


def usage(answer: httpx.Response) -> dict:
    return json.loads(answer.headers["x-servegraph-usage"])


async def test_a_repeated_question_is_answered_from_the_cache_until_its_source_changes(
    servers: dict[str, Any], keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = platform(servers, monkeypatch)
    llm, index = servers["llm"], servers["vector_index"]
    documents = [d.model_dump() for d in knowledge_base()]
    async with client(app, keys["acme"]) as acme, client(app, keys["globex"]) as globex:
        await ingest(acme, documents)
        await ingest(globex, documents)
        first = await acme.post("/rag", json=QUESTION)
        assert first.status_code == 200 and first.headers["x-servegraph-cache"] == "miss"
        await kept(index, 1)
        # The same question retyped (found by its words, no embedding), and the same
        # words in another order (found by its embedding): one LLM call in all.
        retyped = {"question": "how long do refunds take after a return"}
        reworded = {"question": "After a return, how long do refunds take?"}
        again = await asyncio.gather(*(acme.post("/rag", json=q) for q in (retyped, reworded)))
        assert len(llm.requests) == 1
        for answer in again:
            assert answer.json() == first.json()
            assert answer.headers["x-servegraph-cache"] == "hit"
            assert usage(answer)["cache_saved_usd"] == pytest.approx(usage(first)["usd"], rel=0.5)
            assert usage(answer)["llm_output_tokens"] == 0
        assert set(usage(again[0])["nodes_ms"]) == {"cache_exact"}
        assert set(usage(again[1])["nodes_ms"]) == {"cache_exact", "cache_embed", "cache_lookup"}
        # Not another tenant's, not with other fields, not when the caller says no-cache.
        other = await globex.post("/rag", json=QUESTION)
        assert other.headers["x-servegraph-cache"] == "miss"
        assert (await acme.post("/rag", json=QUESTION | {"k": 2})).headers[
            "x-servegraph-cache"
        ] == "miss"
        fresh = await acme.post("/rag", json=QUESTION, headers={"cache-control": "no-cache"})
        assert fresh.headers["x-servegraph-cache"] == "bypass" and len(llm.requests) == 4
        await kept(index, 4)  # globex's, k=2's and the no-cache one's, each kept
        unkept = {"question": "Which carriers deliver parcels?"}
        await acme.post("/rag", json=unkept, headers={"cache-control": "no-store"})

        # A write to a document the answer was built from: the next one is made anew.
        cited = {p["doc_id"] for p in first.json()["passages"]}
        changed = [d for d in documents if d["id"] in cited][:1]
        await ingest(acme, [{**changed[0], "text": changed[0]["text"] + "\n\nUpdated."}])
        after = await acme.post("/rag", json=QUESTION)
        assert after.headers["x-servegraph-cache"] == "miss"
        # globex's answer, built from globex's own copy, is still there.
        assert (await globex.post("/rag", json=QUESTION)).headers["x-servegraph-cache"] == "hit"


async def test_a_streamed_hit_and_a_new_ingress_over_the_same_index(
    servers: dict[str, Any], keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = [d.model_dump() for d in knowledge_base()]
    async with client(platform(servers, monkeypatch), keys["acme"]) as acme:
        await ingest(acme, documents)
        first = await acme.post("/rag", json=QUESTION)
        await kept(servers["vector_index"], 1)
    # An ingress started again (a new replica, after a restart) finds what was kept.
    async with client(platform(servers, monkeypatch), keys["acme"]) as acme:
        streamed = await acme.post("/rag/stream", json=QUESTION)
        events = sse_events(streamed.text)
    assert [e[0] for e in events] == ["usage", "result"]
    assert events[0][1]["cache"] == "hit" and events[1][1] == first.json()
    assert len(servers["llm"].requests) == 1
