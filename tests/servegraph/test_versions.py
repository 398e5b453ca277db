"""Two versions of one pipeline behind the real ingress app, with toy servers (no Ray):
the default answers until traffic is set; a header pins a version (404 naming the
versions served when unknown); every answer names its version; an admin sets the
split (422 naming the field when it is wrong); a shadow runs beside the primary and
the caller never waits for it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypedDict

import httpx
import pytest

from servegraph import Catalog, MethodContract, Pipeline, ServerSpec
from servegraph.lang.graph import Graph
from servegraph.security.client import client_headers
from servegraph.security.keys import KeyStore
from servegraph.serving.ingress import build_fastapi
from servegraph.serving.traffic import Board, TrafficView
from servegraph.serving.versions import LocalBoard
from tests.servegraph import toy
from tests.servegraph.test_http_stream import ToyInvoker


class Held:
    """A server whose `echo` waits until released: the shadow's slow model."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = asyncio.Event()

    async def echo(self, request: toy.Text) -> toy.Echo:
        self.entered += 1
        await self.release.wait()
        return toy.Echo(text=request.text)


def say(version: str) -> Graph:
    p = Pipeline("say", input=toy.Text, output=str, version=version)
    if version == "v1":
        said = p.call("said", "writer", "write", text=p.input.text)
    else:  # the candidate: another server, and louder
        said = p.call("said", "flaky", "echo", text=p.input.text)
    p.returns(p.function("loud", toy.shout if version == "v2" else toy.whisper, text=said.text))
    return p.build()


@pytest.fixture
async def ingress(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Held, LocalBoard]]:
    held = Held()
    versions = {"say": {"v1": say("v1"), "v2": say("v2")}}
    board = LocalBoard(Board(tmp_path / "traffic.json"))
    app = build_fastapi(
        {"say": versions["say"]["v1"]},
        toy.CATALOG,
        ToyInvoker(toy.servers(flaky=held)),
        versions=versions,
        board=board,
    )
    async with httpx.AsyncClient(
        headers=client_headers(), transport=httpx.ASGITransport(app=app), base_url="http://i"
    ) as client:
        yield client, held, board
    held.release.set()


async def test_the_default_answers_until_traffic_is_set_and_each_answer_names_its_version(
    ingress: tuple[httpx.AsyncClient, Held, LocalBoard],
) -> None:
    client, held, _ = ingress
    plain = await client.post("/say", json={"text": "Hello There"})
    assert plain.status_code == 200 and plain.json() == "hello there"
    assert plain.headers["x-pipeline-version"] == "v1"
    assert json.loads(plain.headers["x-servegraph-usage"])["version"] == "v1"
    listed = (await client.get("/")).json()["pipelines"]
    assert [p["versions"] for p in listed] == [["v1", "v2"]]

    held.release.set()
    pinned = await client.post("/say", json={"text": "hi"}, headers={"x-pipeline-version": "v2"})
    assert pinned.json() == "HI" and pinned.headers["x-pipeline-version"] == "v2"
    unknown = await client.post("/say", json={"text": "hi"}, headers={"x-pipeline-version": "v9"})
    assert unknown.status_code == 404
    assert unknown.json()["versions"] == ["v1", "v2"] and "'v9'" in unknown.json()["detail"]

    streamed = await client.post(
        "/say/stream", json={"text": "hi"}, headers={"x-pipeline-version": "v2"}
    )
    assert streamed.headers["x-pipeline-version"] == "v2"
    assert '"version":"v2"' in streamed.text.replace(" ", "")


async def test_an_admin_sets_the_split_and_a_wrong_one_is_refused_naming_the_field(
    ingress: tuple[httpx.AsyncClient, Held, LocalBoard],
) -> None:
    client, held, board = ingress
    held.release.set()
    assert (await client.get("/say/traffic")).json()["split"]["weights"] == {"v1": 100}
    moved = await client.put("/say/traffic", json={"weights": {"v1": 0, "v2": 100}})
    assert moved.status_code == 200, moved.text
    assert moved.json()["split"]["weights"] == {"v1": 0, "v2": 100}
    answer = await client.post("/say", json={"text": "hi"})
    assert answer.json() == "HI" and answer.headers["x-pipeline-version"] == "v2"
    assert (await board.table(-1))[1] == {"say": moved.json()["split"]}

    bad_sum = await client.put("/say/traffic", json={"weights": {"v1": 50, "v2": 20}})
    assert bad_sum.status_code == 422 and "sum to 70" in bad_sum.text
    assert bad_sum.json()["detail"][0]["field"] == "weights"
    unknown = await client.put("/say/traffic", json={"weights": {"v1": 50, "v3": 50}})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["field"] == "weights.v3"
    assert "v1, v2" in unknown.json()["detail"][0]["fix"]

    key = KeyStore(Path(os.environ["SERVEGRAPH_AUTH_KEYS"])).create(
        "versions-caller", ["invoke:say"]
    )
    caller = {"authorization": f"Bearer {key}"}
    assert (await client.get("/say/traffic", headers=caller)).status_code == 200
    refused = await client.put("/say/traffic", json={"weights": {"v1": 100}}, headers=caller)
    assert refused.status_code == 403 and "admin" in refused.text

    cleared = await client.delete("/say/traffic")
    assert cleared.json()["split"]["weights"] == {"v1": 100}
    assert (await client.post("/say", json={"text": "hi"})).headers["x-pipeline-version"] == "v1"


async def test_a_shadow_runs_beside_the_primary_and_the_caller_never_waits_for_it(
    ingress: tuple[httpx.AsyncClient, Held, LocalBoard],
) -> None:
    client, held, _ = ingress
    split = {"weights": {"v1": 100}, "shadow": "v2", "shadow_percent": 100}
    assert (await client.put("/say/traffic", json=split)).status_code == 200
    answer = await client.post("/say", json={"text": "Hello There"})
    # Answered by v1 while v2's server holds the shadow's call (or before it got there).
    assert answer.status_code == 200 and answer.json() == "hello there"
    for _ in range(1_000):  # bounded: until the shadow's call is in the held server
        if held.entered == 1:
            break
        await asyncio.sleep(0.01)
    assert held.entered == 1
    shadows = (await client.get("/say/shadow")).json()
    assert shadows["running"] == 1 and shadows["recent"] == []

    held.release.set()
    for _ in range(1_000):  # bounded: until the shadow's record is in
        shadows = (await client.get("/say/shadow")).json()
        if shadows["recent"]:
            break
        await asyncio.sleep(0.01)
    (record,) = shadows["recent"]
    assert (record["primary"], record["shadow"]) == ("v1", "v2")
    assert (record["primary_status"], record["shadow_status"]) == (200, 200)
    assert record["agreement"] == 1.0  # the same words, louder
    pinned = await client.post("/say", json={"text": "x"}, headers={"x-pipeline-version": "v1"})
    assert pinned.status_code == 200 and held.entered == 1  # a pinned request: no shadow


async def test_a_split_set_elsewhere_reaches_a_replica_by_its_refresh(tmp_path: Path) -> None:
    board = LocalBoard(Board(tmp_path / "traffic.json"))
    view = TrafficView({"say": ["v1", "v2"]}, board)
    keeping = asyncio.create_task(view.keep())
    try:
        await board.set("say", {"weights": {"v1": 10, "v2": 90}})  # another replica's PUT
        for _ in range(300):  # bounded: REFRESH_S is 0.5 s
            if view.split("say").weights == {"v1": 10, "v2": 90}:
                break
            await asyncio.sleep(0.01)
        assert view.split("say").weights == {"v1": 10, "v2": 90}
        # A split naming a version this replica no longer serves is not used.
        await board.set("say", {"weights": {"v1": 50, "v3": 50}})
        revision = (await board.table(-1))[0]
        for _ in range(300):
            if view.revision == revision:
                break
            await asyncio.sleep(0.01)
        assert view.split("say").weights == {"v1": 100}
    finally:
        keeping.cancel()


WRITING = Catalog(
    [
        *toy.CATALOG.values(),
        ServerSpec(
            "notes", {"keep": MethodContract(toy.Text, toy.Echo, writes=True)}, "x:y", "N", "/n"
        ),
    ]
)


class Notes:
    def __init__(self) -> None:
        self.kept: list[str] = []

    async def keep(self, request: toy.Text) -> toy.Echo:
        self.kept.append(request.text)
        return toy.Echo(text=request.text)


def noted(version: str) -> Graph:
    """v1 reads (the writer echoes); v2 writes a note, then v3 fails its call once."""
    p = Pipeline("noted", input=toy.Text, output=str, version=version)
    server, method = {"v1": ("writer", "write"), "v2": ("notes", "keep"), "v3": ("flaky", "echo")}[
        version
    ]
    said = p.call("said", server, method, text=p.input.text)
    p.returns(p.function("loud", toy.shout, text=said.text))
    return p.build()


async def test_a_version_that_writes_needs_the_write_scope_and_may_not_be_a_shadow(
    tmp_path: Path,
) -> None:
    notes = Notes()
    versions = {"noted": {v: noted(v) for v in ("v1", "v2", "v3")}}
    app = build_fastapi(
        {"noted": versions["noted"]["v1"]},
        WRITING,
        ToyInvoker(toy.servers(notes=notes, flaky=toy.Flaky(failures=5))),
        versions=versions,
        board=LocalBoard(Board(tmp_path / "traffic.json")),
    )
    store = KeyStore(Path(os.environ["SERVEGRAPH_AUTH_KEYS"]))
    key = store.create("noted-reader", ["invoke:noted"])
    async with httpx.AsyncClient(
        headers=client_headers(), transport=httpx.ASGITransport(app=app), base_url="http://i"
    ) as client:
        # Any request may run v2 (its weight, a pin): the route asks for write:noted.
        reader = {"authorization": f"Bearer {key}"}
        refused = await client.post("/noted", json={"text": "hi"}, headers=reader)
        assert refused.status_code == 403 and "write:noted" in refused.text
        shadowing = {"weights": {"v1": 100}, "shadow": "v2", "shadow_percent": 100}
        answer = await client.put("/noted/traffic", json=shadowing)
        assert answer.status_code == 422 and answer.json()["detail"][0]["field"] == "shadow"
        assert "said" in answer.json()["detail"][0]["error"] and notes.kept == []
        # A failed answer names its version too (v3's call fails, without retries: 502).
        failed = await client.post(
            "/noted", json={"text": "hi"}, headers={"x-pipeline-version": "v3"}
        )
        assert failed.status_code == 502 and failed.headers["x-pipeline-version"] == "v3"


def test_a_view_never_goes_back_to_an_older_table() -> None:
    view = TrafficView({"say": ["v1", "v2"]})
    view.apply(10, {"say": {"weights": {"v1": 0, "v2": 100}}})
    view.apply(9, {"say": {"weights": {"v1": 100}}})  # a read that started before
    assert view.split("say").weights == {"v1": 0, "v2": 100} and view.revision == 10


class Recorded:
    """The ingress's metrics, as calls (the subject: what is recorded per version)."""

    def __init__(self) -> None:
        self.signals: list[tuple[str, str, dict[str, float]]] = []

    def record(self, *args: object) -> None: ...

    def record_version(self, *args: object) -> None: ...

    def record_agreement(self, *args: object) -> None: ...

    def record_signals(self, pipeline: str, version: str, role: str, signals: dict) -> None:
        self.signals.append((version, role, signals))


class Loudness(TypedDict):
    upper: float
    words: float


def loudness(text: str) -> Loudness:
    if text == "BREAK":
        raise ValueError("a signal function's own bug")
    return {"upper": float(text.isupper()), "words": float(len(text.split()))}


def signalled(version: str) -> Graph:
    p = Pipeline("sig", input=toy.Text, output=str, version=version, signals=loudness)
    said = p.call("said", "writer", "write", text=p.input.text)
    p.returns(p.function("loud", toy.shout if version == "v2" else toy.whisper, text=said.text))
    return p.build()


async def test_each_answers_signals_are_recorded_for_its_version_and_role(tmp_path: Path) -> None:
    metrics = Recorded()
    versions = {"sig": {v: signalled(v) for v in ("v1", "v2")}}
    app = build_fastapi(
        {"sig": versions["sig"]["v1"]},
        toy.CATALOG,
        ToyInvoker(toy.servers()),
        metrics,
        versions=versions,
        board=LocalBoard(Board(tmp_path / "traffic.json")),
    )
    async with httpx.AsyncClient(
        headers=client_headers(), transport=httpx.ASGITransport(app=app), base_url="http://i"
    ) as client:
        split = {"weights": {"v1": 100}, "shadow": "v2", "shadow_percent": 100}
        assert (await client.put("/sig/traffic", json=split)).status_code == 200
        assert (await client.post("/sig", json={"text": "Two Words"})).status_code == 200
        for _ in range(1_000):  # bounded: until the shadow's signals are in
            if len(metrics.signals) == 2:
                break
            await asyncio.sleep(0.01)
        shown = (await client.get("/sig/traffic")).json()
        assert shown["signals"] == {"v1": ["upper", "words"], "v2": ["upper", "words"]}
        assert sorted(metrics.signals) == [
            ("v1", "primary", {"upper": 0.0, "words": 2.0}),
            ("v2", "shadow", {"upper": 1.0, "words": 2.0}),
        ]
        # A signal function that raises is its own loss, never the answer's.
        broken = await client.post(
            "/sig", json={"text": "break"}, headers={"x-pipeline-version": "v2"}
        )
        assert broken.status_code == 200 and broken.json() == "BREAK"


def test_a_signals_function_that_cannot_be_imported_is_a_validation_problem() -> None:
    from servegraph.errors import GraphValidationError
    from servegraph.lang.validation import validate

    graph = signalled("v1").model_copy(update={"signals": "nowhere.at_all:signals"})
    with pytest.raises(GraphValidationError) as refused:
        validate(graph, toy.CATALOG)
    assert "[signals]" in str(refused.value) and "nowhere.at_all" in str(refused.value)


def untyped(text: str) -> dict[str, float]:
    return {"upper": float(text.isupper())}


def test_a_signals_function_must_declare_its_signals() -> None:
    """A rollout's gates name signals before any answer is read: the function's return
    is a TypedDict that names them."""
    from servegraph.errors import GraphValidationError
    from servegraph.lang.validation import validate

    graph = signalled("v1").model_copy(update={"signals": f"{__name__}:untyped"})
    with pytest.raises(GraphValidationError) as refused:
        validate(graph, toy.CATALOG)
    assert "does not declare its signals" in str(refused.value)
    assert "TypedDict" in str(refused.value)
