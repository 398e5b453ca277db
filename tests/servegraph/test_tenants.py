"""Tenants end to end without Ray: keys of two tenants calling pipelines on the ingress
(over ASGI, many at once) against the real vector index in this process; the tenant
comes from the key and is set by the runtime on every index call, an admin key acts for
a named tenant, any other key asking for one is refused; the index's limits answer 429
naming the limit and the node; the model server's own REST surface acts for a tenant
too; and a pipeline that wires the tenant itself is refused when it is checked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from deployments.catalog import CATALOG
from deployments.vector_index import vector_index
from deployments.vector_index.contract import (
    AddResponse,
    CountResponse,
    IndexItem,
    SearchResponse,
)
from deployments.vector_index.model import VectorIndex
from deployments.vector_index.store import TenantLimits
from servegraph import Pipeline, check
from servegraph.engine.runtime import InProcessServers
from servegraph.security.guard import Guard
from servegraph.security.keys import Caller, KeySpec, KeyStore
from servegraph.serving.gateway import build_gateway
from servegraph.serving.ingress import build_fastapi
from servegraph.tenants import DEFAULT_TENANT
from tests.auth_fakes import asgi_client as client


class Note(BaseModel):
    doc_id: str
    text: str
    seed: int = 0


class Query(BaseModel):
    seed: int = 0


def vector(seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def items(doc_id: str, text: str, seed: int) -> list[IndexItem]:
    return [
        IndexItem(
            id=f"{doc_id}#{n}", text=text, vector=vector(seed + n), metadata={"doc_id": doc_id}
        )
        for n in range(2)
    ]


def replacing(doc_id: str) -> list[dict[str, str]]:
    return [{"doc_id": doc_id}]


def query_vector(seed: int) -> np.ndarray:
    return np.asarray(vector(seed), dtype=np.float32)


def texts(found: SearchResponse) -> list[str]:
    return sorted({hit.text for hit in found.hits})


def note_pipeline() -> Pipeline:
    p = Pipeline("note", input=Note, output=AddResponse)
    made = p.function("items", items, doc_id=p.input.doc_id, text=p.input.text, seed=p.input.seed)
    old = p.function("replace", replacing, doc_id=p.input.doc_id)
    p.returns(p.call("index", vector_index.add(items=made, replace=old), idempotent=True))
    return p


def find_pipeline() -> Pipeline:
    p = Pipeline("find", input=Query, output=list[str])
    v = p.function("vector", query_vector, seed=p.input.seed)
    found = p.call("search", vector_index.search(vector=v, k=20))
    p.returns(p.function("texts", texts, found=found))
    return p


def count_pipeline() -> Pipeline:
    p = Pipeline("tally", input=Query, output=CountResponse)
    p.returns(p.call("count", vector_index.count()))
    return p


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VectorIndex:
    monkeypatch.setenv("SERVEGRAPH_INDEX_MAX_DOCUMENTS_PER_TENANT", "3")
    monkeypatch.setenv("SERVEGRAPH_INDEX_TENANT_LIMITS", '{"acme": {"max_documents": 4}}')
    return VectorIndex(tmp_path / "index")


async def test_each_tenants_keys_read_and_write_only_their_tenants_documents(
    guard: Guard, store: KeyStore, index: VectorIndex
) -> None:
    graphs = {g.name: g.build() for g in (note_pipeline(), find_pipeline(), count_pipeline())}
    invoker = InProcessServers({"vector_index": index}, threads=True)
    app = build_fastapi(graphs, CATALOG, invoker)
    scopes = ["write:note", "invoke:find", "invoke:tally"]
    keys = {t: store.create(f"{t}-app", scopes, tenant=t) for t in ("acme", "globex")}
    admin = store.create("ops", ["admin"])  # the default tenant's

    async def write_and_read(tenant: str, n: int) -> list[str]:
        async with client(app, keys[tenant]) as c:
            # The same document ids in both tenants, written and read at once.
            note = {"doc_id": f"doc{n % 3}", "text": f"{tenant} note {n % 3}", "seed": n % 3}
            assert (await c.post("/note", json=note)).status_code == 200
            found = await c.post("/find", json={"seed": 1})
            assert found.status_code == 200, found.text
            return found.json()

    seen = await asyncio.gather(*(write_and_read(t, n) for n in range(12) for t in keys))
    for tenant, texts_seen in zip([t for _ in range(12) for t in keys], seen, strict=True):
        assert texts_seen and all(text.startswith(f"{tenant} ") for text in texts_seen)
    assert index._store.tenants() == {"acme": 6, "globex": 6}

    async with client(app, keys["acme"]) as acme, client(app, admin) as ops:
        assert (await acme.post("/tally", json={})).json() == {"count": 6}
        assert (await ops.post("/tally", json={})).json() == {"count": 0}  # its own: none
        acting = await ops.post("/tally", json={}, headers={"X-Servegraph-Tenant": "globex"})
        assert acting.json() == {"count": 6}
        refused = await acme.post("/find", json={}, headers={"X-Servegraph-Tenant": "globex"})
        assert refused.status_code == 403
        assert "'admin'" in refused.json()["detail"] and "globex" in refused.json()["detail"]
        own = await acme.post("/tally", json={}, headers={"X-Servegraph-Tenant": "acme"})
        assert own.json() == {"count": 6}  # naming its own tenant is no escalation
        bad = await ops.post("/tally", json={}, headers={"X-Servegraph-Tenant": "Globex!"})
        assert bad.status_code == 422 and "x-servegraph-tenant" in bad.text.lower()

        # Limits: acme holds 4 documents, every other tenant 3 (it has 3 already).
        assert (await acme.post("/note", json={"doc_id": "d4", "text": "x"})).status_code == 200
        over = await acme.post("/note", json={"doc_id": "d5", "text": "x"})
        assert over.status_code == 429, over.text
        assert over.json()["node"] == "index" and "max_documents = 4" in over.json()["detail"]
        over = await ops.post(
            "/note", json={"doc_id": "d4", "text": "x"}, headers={"X-Servegraph-Tenant": "globex"}
        )
        assert over.status_code == 429 and "max_documents = 3" in over.json()["detail"]
    assert index._store.tenants() == {"acme": 8, "globex": 6}
    # Usage is counted under the tenant each request ran for.
    assert {"acme", "globex", DEFAULT_TENANT} <= set(guard.usage.tenants)


async def test_the_index_rest_surface_acts_for_the_tenant_the_admin_names(
    guard: Guard, store: KeyStore, index: VectorIndex
) -> None:
    app = build_gateway(
        CATALOG["vector_index"], CATALOG, InProcessServers({"vector_index": index}, threads=True)
    )
    admin = store.create("ops", ["admin"], tenant="ops")
    body = {"items": [item.model_dump(mode="json") for item in items("a", "acme's", 0)]}
    async with client(app, admin) as ops:
        added = await ops.post("/add", json=body, headers={"X-Servegraph-Tenant": "acme"})
        assert added.status_code == 200 and added.json()["count"] == 2
        assert (await ops.post("/add", json={**body, "tenant": "globex"})).status_code == 200
        assert (await ops.post("/count", json={})).json() == {"count": 0}  # the key's: ops
        both = await ops.post(
            "/count", json={"tenant": "acme"}, headers={"X-Servegraph-Tenant": "globex"}
        )
        assert both.status_code == 422 and "name one tenant" in both.text
    assert index._store.tenants() == {"acme": 2, "globex": 2}


def test_a_pipeline_that_wires_the_tenant_itself_is_refused() -> None:
    p = Pipeline("sneaky", input=Query, output=CountResponse)
    p.returns(p.call("count", vector_index.count(tenant="globex")))
    (problem,) = check(p.build(), CATALOG)
    assert problem.node == "count" and problem.port == "tenant"
    assert "set by the platform" in problem.message


def test_a_key_acts_for_its_own_tenant_and_only_an_admin_for_another(store: KeyStore) -> None:
    from servegraph.security.keys import AuthError

    reader = Caller("reader", frozenset({"invoke:rag"}), tenant="acme")
    assert reader.acting_for(None) == reader.acting_for("acme") == "acme"
    with pytest.raises(AuthError) as refused:
        reader.acting_for("globex")
    assert refused.value.status == 403
    assert Caller("ops", frozenset({"admin"})).acting_for("globex") == "globex"
    # A key stored before tenants is the default tenant's; a bad name is refused.
    old = KeySpec.model_validate({"name": "old", "scopes": ["llm"], "created": 0})
    assert old.tenant == DEFAULT_TENANT
    with pytest.raises(ValueError, match="tenant"):
        store.create("bad", ["llm"], tenant="Acme Corp")
    key = store.create("acme-app", ["invoke:rag"], tenant="acme")
    assert store.verify(key).tenant == "acme"
    assert [s.tenant for s in store.list()] == ["acme"]


def test_the_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.vector_index.model import IndexSettings

    monkeypatch.setenv("SERVEGRAPH_INDEX_MAX_VECTORS_PER_TENANT", "100")
    monkeypatch.setenv("SERVEGRAPH_INDEX_TENANT_LIMITS", '{"acme": {"max_documents": 4}}')
    named, default = IndexSettings().limits()
    assert default == TenantLimits(max_vectors=100)
    assert named == {"acme": TenantLimits(max_vectors=100, max_documents=4)}
    monkeypatch.setenv("SERVEGRAPH_INDEX_TENANT_LIMITS", '{"Acme": {}}')
    with pytest.raises(ValueError, match="tenant_limits"):
        IndexSettings().limits()


def test_keys_create_gives_a_key_its_tenant_and_list_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from servegraph.cli import main

    monkeypatch.setenv("SERVEGRAPH_AUTH_KEYS", str(tmp_path / "cli-keys.sqlite3"))
    assert main(["keys", "create", "--name", "acme-app", "--tenant", "acme", "--scope", "llm"]) == 0
    key = capsys.readouterr().out.split()[-1]
    assert KeyStore(tmp_path / "cli-keys.sqlite3").verify(key).tenant == "acme"
    assert main(["keys", "create", "--name", "bad", "--tenant", "Acme!", "--scope", "llm"]) == 2
    assert "tenant" in capsys.readouterr().out
    assert main(["keys", "list"]) == 0
    assert "acme-app  tenant=acme  scopes=llm" in capsys.readouterr().out


def test_a_cache_on_a_pipeline_that_writes_or_on_a_store_without_tenants_is_refused() -> None:
    from servegraph import AnswerCache

    p = Pipeline(
        "cached_note",
        input=Note,
        output=AddResponse,
        cache=AnswerCache(question="text", sources="ids.id"),
    )
    made = p.function("items", items, doc_id=p.input.doc_id, text=p.input.text, seed=p.input.seed)
    p.returns(p.call("index", vector_index.add(items=made)))
    found = {(problem.port, problem.message.split(":")[0]) for problem in check(p.build(), CATALOG)}
    assert ("cache", "node 'index' writes (vector_index.add)") in found
    assert any(port == "sources" for port, _ in found)  # AddResponse has no list `ids`
