"""API keys, scopes and limits (`servegraph.security`, `servegraph.security.limits`)
without Ray: the key store on a real SQLite file shared by several "replicas", the
FastAPI check on a real app over ASGI with many callers at once, and the token buckets
on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from deployments.catalog import CATALOG
from deployments.llm.metering import meter
from servegraph.lang.discovery import discover
from servegraph.security.endpoints import guard_endpoint
from servegraph.security.guard import Guard
from servegraph.security.keys import KeyStore
from servegraph.security.limits import Limiter
from servegraph.serving.gateway import build_gateway
from servegraph.serving.ingress import pipeline_scope
from tests.auth_fakes import Clock
from tests.auth_fakes import asgi_client as client


def test_a_key_is_stored_only_as_a_hash_and_listed_without_it(store: KeyStore) -> None:
    key = store.create("alice", ["invoke:rag"])
    assert key.startswith("sg_") and len(key) > 50
    secret = key.split("_", 2)[2]  # the secret itself may hold "_"
    data = b"".join(p.read_bytes() for p in store.path.parent.glob("keys.sqlite3*"))
    assert secret.encode() not in data and key.encode() not in data
    (listed,) = store.list()
    assert listed.name == "alice" and listed.scopes == ["invoke:rag"]
    assert key not in listed.model_dump_json()
    assert store.verify(key).name == "alice"
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "sg_000000000000_" + "x" * 43, ""):
        assert store.verify(wrong) is None


def test_names_are_unique_and_scopes_checked(store: KeyStore) -> None:
    store.create("bob", ["llm"])
    with pytest.raises(ValueError, match="exists"):
        store.create("bob", ["llm"])
    with pytest.raises(ValueError, match="unknown scope"):
        store.create("carol", ["everything"])


async def test_a_revoked_key_stops_working_on_every_replica_within_the_cache_time(
    store: KeyStore,
) -> None:
    key = store.create("dave", ["admin"])
    replicas = [KeyStore(store.path, cache_s=0.05) for _ in range(4)]
    assert all(r.verify(key) for r in replicas)
    KeyStore(store.path).revoke("dave")  # `servegraph keys revoke`, another process
    for _ in range(200):  # bounded wait for the condition, not a fixed sleep
        if not any(r.verify(key) for r in replicas):
            break
        await asyncio.sleep(0.01)
    assert not any(r.verify(key) for r in replicas)


def test_the_local_admin_key_is_created_once(store: KeyStore, tmp_path: Path) -> None:
    file = tmp_path / "local-admin.key"
    key, created = store.ensure_local_admin(file)
    assert created and file.stat().st_mode & 0o777 == 0o600
    assert store.ensure_local_admin(file) == (key, False)
    file.unlink()  # lost: a new one, and the old one no longer works
    new, created = store.ensure_local_admin(file)
    assert created and new != key and store.verify(key) is None


def test_request_buckets_allow_a_one_second_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    admitted = [limiter.admit("k", 5, None) == 0 for _ in range(20)]
    assert sum(admitted) == 5
    wait = limiter.admit("k", 5, None)
    assert 0 < wait <= 0.2
    clock.now += 1.0
    assert sum(limiter.admit("k", 5, None) == 0 for _ in range(20)) == 5
    assert limiter.admit("other", 5, None) == 0  # per key


def test_token_budgets_go_into_debt_and_refill() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    assert limiter.admit("k", None, 600) == 0
    assert limiter.spend("k", 900, 600) == -300  # an answer may use more than is left
    wait = limiter.admit("k", None, 600)
    assert wait == pytest.approx(301 / 10)  # until the balance is positive again
    clock.now += 31
    assert limiter.admit("k", None, 600) == 0


def app_with(scope: str | None) -> FastAPI:
    from fastapi import Depends

    from servegraph.security.endpoints import require
    from servegraph.serving.http import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/thing", dependencies=[Depends(require(scope))])
    async def thing() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_no_key_and_bad_keys_get_the_same_401_a_missing_scope_a_403(
    guard: Guard, store: KeyStore
) -> None:
    app = app_with("invoke:rag")
    reader = store.create("reader", ["invoke:triage"])
    revoked = store.create("gone", ["invoke:rag"])
    store.revoke("gone")
    answers = []
    for key in (None, "nonsense", "sg_0123456789ab_" + "a" * 43, revoked):
        async with client(app, key) as c:
            answers.append(await c.get("/thing"))
    assert {a.status_code for a in answers} == {401}
    assert len({a.text for a in answers}) == 1  # nothing tells which it was
    assert all(a.headers["www-authenticate"].startswith("Bearer") for a in answers)
    for a in answers:
        assert revoked not in a.text
    async with client(app, reader) as c:
        forbidden = await c.get("/thing")
    assert forbidden.status_code == 403 and "invoke:rag" in forbidden.json()["detail"]
    async with client(app, store.create("wild", ["invoke:*"])) as c:
        assert (await c.get("/thing")).status_code == 200
    async with client(app, store.create("admin", ["admin"])) as c:
        assert (await c.get("/thing")).status_code == 200


async def test_many_callers_of_one_limited_key_get_its_rate_and_429s(
    guard: Guard, store: KeyStore
) -> None:
    app = app_with(None)
    key = store.create("busy", ["invoke:*"], requests_per_s=10)
    async with client(app, key) as c:
        answers = await asyncio.gather(*(c.get("/thing") for _ in range(64)))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 10 and statuses.count(429) == 54  # the clock stood still
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and "busy" in refused.json()["detail"]
    recorded = guard.usage.seen
    assert [s for _, s, _ in recorded].count(429) == 54
    assert all(name == "busy" for name, _, _ in recorded)  # the name, never the key


async def test_a_guarded_route_of_an_app_we_do_not_build_checks_and_charges(
    guard: Guard, store: KeyStore
) -> None:
    async def models() -> JSONResponse:  # like ray.serve.llm's OpenAI routes
        return JSONResponse({"data": []})

    async def chat(body: dict, request: Request) -> JSONResponse:
        return JSONResponse({"usage": {"prompt_tokens": 7, "completion_tokens": 3}})

    app = FastAPI()  # an app we do not build: no error handlers of ours
    app.get("/v1/models")(guard_endpoint(models, "llm"))
    app.post("/v1/chat")(guard_endpoint(chat, "llm", llm=True, meter=meter("chat", lambda: 64)))

    key = store.create("llm-user", ["llm"], tokens_per_min=600)
    async with client(app, None) as c:
        assert (await c.post("/v1/chat", json={})).status_code == 401
        assert (await c.post("/v1/chat", json=[])).status_code == 401  # before the body
        assert (await c.get("/v1/models")).status_code == 401
    async with client(app, key) as c:
        # Each reserves its max_tokens (and a prompt of nothing) first: 8 fit in 600.
        answers = await asyncio.gather(
            *(c.post("/v1/chat", json={"max_tokens": 3}) for _ in range(8))
        )
    assert [a.status_code for a in answers] == [200] * 8
    charged = [t for name, status, t in guard.usage.seen if name == "llm-user" and status == 200]
    assert charged == [{"input": 7, "output": 3}] * 8
    async with client(app, store.create("no-llm", ["invoke:*"])) as c:
        assert (await c.post("/v1/chat", json={})).status_code == 403


def test_a_pipeline_that_writes_needs_the_write_scope() -> None:
    graphs = discover("pipelines")
    assert pipeline_scope(graphs["rag_ingest"], CATALOG) == "write:rag_ingest"
    assert pipeline_scope(graphs["rag"], CATALOG) == "invoke:rag"
    assert pipeline_scope(graphs["triage"], CATALOG) == "invoke:triage"
    # A write an approval proposes is carried out by a person holding approve:refund.
    assert pipeline_scope(graphs["refund"], CATALOG) == "invoke:refund"


async def test_a_model_servers_rest_surface_is_admin_only(guard: Guard, store: KeyStore) -> None:
    app = build_gateway(CATALOG["vector_index"], CATALOG, invoke=None)
    async with client(app, store.create("writer", ["write:*", "invoke:*"])) as c:
        refused = await c.post("/delete", json={"filter": {"source": "kb"}})
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    async with client(app, None) as c:
        assert (await c.post("/delete", json={"filter": {"source": "kb"}})).status_code == 401
        assert (await c.get("/docs")).status_code == 200  # open by configuration


async def test_when_the_shared_limiter_cannot_answer_requests_are_admitted(
    guard: Guard, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DeadActor:
        def admit(self, *args: object) -> float:
            raise RuntimeError("the actor died")

    # Dead now, and still dead when the guard looks the actor up again.
    guard._limiter = DeadActor()
    monkeypatch.setattr("servegraph.security.limits.shared_limiter", DeadActor)
    key = store.create("during-restart", ["invoke:*"], requests_per_s=1)
    async with client(app_with(None), key) as c:
        answers = await asyncio.gather(*(c.get("/thing") for _ in range(16)))
    assert {a.status_code for a in answers} == {200}  # fails open, never a 500


def test_every_keyed_route_documents_401_403_and_429() -> None:
    """What the fuzzer checks on the cluster: no answer a route's OpenAPI leaves out."""
    from servegraph.serving.ingress import build_fastapi

    apps = {
        "ingress": build_fastapi(discover("pipelines"), CATALOG, invoke=None),
        **{name: build_gateway(CATALOG[name], CATALOG, invoke=None) for name in CATALOG},
    }
    for name, app in apps.items():
        for path, operations in app.openapi()["paths"].items():
            for method, operation in operations.items():
                assert {"401", "403", "429"} <= set(operation["responses"]), (name, method, path)


# -- file modes: the key store and the local admin key are the owner's only -------------


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that lets others read new files (0644), as on many machines."""
    import os

    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_store_is_private_from_its_first_file_on(tmp_path: Path, open_umask: None) -> None:
    import sqlite3

    store = KeyStore(tmp_path / "auth" / "keys.sqlite3")
    assert store.list() == []  # opened, and created, before any key is stored
    assert mode(store.path.parent) == 0o700 and mode(store.path) == 0o600
    # SQLite's -wal and -shm, which hold the newest rows, exist while a connection is
    # open (this reader's, as a replica's would be): created private too.
    reader = sqlite3.connect(store.path)
    try:
        reader.execute("SELECT count(*) FROM keys").fetchone()
        store.create("alice", ["invoke:rag"])
        side = [store.path.with_name(store.path.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side)
        assert [mode(p) for p in side] == [0o600, 0o600]
    finally:
        reader.close()


def test_a_store_left_readable_by_others_is_tightened(tmp_path: Path, open_umask: None) -> None:
    import sqlite3

    store = KeyStore(tmp_path / "keys.sqlite3")
    key = store.create("alice", ["invoke:rag"])
    reader = sqlite3.connect(store.path)  # keeps the -wal and -shm files
    try:
        reader.execute("SELECT count(*) FROM keys").fetchone()
        files = [store.path, *(store.path.with_name(store.path.name + s) for s in ("-wal", "-shm"))]
        for path in files:
            path.chmod(0o644)  # as an earlier version left them
        assert KeyStore(store.path, cache_s=0).verify(key) is not None  # a replica reads it
        assert [mode(p) for p in files] == [0o600] * 3
    finally:
        reader.close()


def test_the_local_admin_key_file_is_0600_even_when_it_existed(
    store: KeyStore, tmp_path: Path, open_umask: None
) -> None:
    file = tmp_path / "local-admin.key"
    key, _ = store.ensure_local_admin(file)
    file.chmod(0o644)
    assert store.ensure_local_admin(file) == (key, False)  # kept, and tightened
    assert mode(file) == 0o600
    file.write_text("sg_not_a_valid_key\n")  # stale: a new key is written into it
    file.chmod(0o644)
    new, created = store.ensure_local_admin(file)
    assert created and new != key and mode(file) == 0o600
    lost = tmp_path / "new" / "local-admin.key"  # a folder this creates: the owner's only
    store.ensure_local_admin(lost)
    assert mode(lost) == 0o600 and mode(lost.parent) == 0o700
