"""`kill -9` of a model server's replica under load: pipelines, and the server's own REST
surface (its gateway), repeat the idempotent calls that were in flight on it, on the
restarted replica, within their deadlines."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import Counter

import httpx
import pytest
import ray
from ray.util.state import list_actors

from benchmarks.traffic import callers
from servegraph.local import LocalCluster

pytestmark = pytest.mark.reliability


def replica_pids(app: str, deployment: str) -> list[int]:
    actors = list_actors(
        filters=[
            ("class_name", "=", f"ServeReplica:{app}:{deployment}"),
            ("state", "=", "ALIVE"),
        ]
    )
    return [int(a.pid) for a in actors]


async def until(condition, timeout_s: float, what: str) -> None:
    """Wait, bounded, for `condition` (checked off the event loop's hot path)."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("app", "deployment"), [("embedder", "Embedder"), ("vector_index", "VectorIndex")]
)
def test_killing_a_replica_under_pipeline_load_loses_no_request(
    pipelines: LocalCluster, app: str, deployment: str
) -> None:
    assert ray.is_initialized()
    (victim,) = replica_pids(app, deployment)
    run = uuid.uuid4().hex[:8]
    stop = asyncio.Event()

    def body(c: int, i: int) -> dict:
        text = f"Note {i} from caller {c}: the parcel arrives on a weekday."
        return {"documents": [{"id": f"{run}/c{c}/d{i}", "text": text, "metadata": {"run": run}}]}

    answers: list = []

    def acked() -> int:
        return sum(a.status == 200 for a in answers)

    async def load() -> None:
        task = asyncio.ensure_future(
            callers(
                pipelines.base_url,
                "/pipelines/rag_ingest",
                body,
                n=8,
                stop=stop,
                max_requests=3_000,
                max_seconds=150,
                headers={"X-Request-Timeout": "60"},
                answers=answers,
            )
        )
        await until(lambda: acked() >= 40, 60, "no progress before the kill")
        os.kill(victim, signal.SIGKILL)
        await until(
            lambda: bool(set(replica_pids(app, deployment)) - {victim}), 120, "no new replica"
        )
        # Keep the load on until 40 more documents were acknowledged after that.
        base = acked()
        await until(lambda: acked() >= base + 40, 120, "no recovery after the restart")
        stop.set()
        await task

    asyncio.run(load())
    statuses = Counter(a.status for a in answers)
    assert statuses[500] == 0, [a.body for a in answers if a.status == 500][:3]
    success = statuses[200] / len(answers)
    assert success >= 0.999, (statuses, [a.body for a in answers if a.status != 200][:3])
    # Nothing acknowledged is lost: every document answered 200 is in the index.
    with httpx.Client(base_url=pipelines.base_url, timeout=60) as client:
        stored = client.post("/index/count", json={"filter": {"run": run}}).json()["count"]
    assert stored == acked()


def test_killing_a_replica_under_load_on_its_own_route_loses_no_request(
    pipelines: LocalCluster,
) -> None:
    (victim,) = replica_pids("embedder", "Embedder")
    answers: list = []
    stop = asyncio.Event()

    def ok() -> int:
        return sum(a.status == 200 for a in answers)

    async def load() -> None:
        task = asyncio.ensure_future(
            callers(
                pipelines.base_url,
                "/embedder/embed_one",
                lambda c, i: {"text": f"ticket {c}-{i}: where is my parcel?"},
                n=16,
                stop=stop,
                max_requests=5_000,
                max_seconds=150,
                answers=answers,
            )
        )
        await until(lambda: ok() >= 100, 60, "no progress before the kill")
        os.kill(victim, signal.SIGKILL)
        await until(
            lambda: bool(set(replica_pids("embedder", "Embedder")) - {victim}),
            120,
            "no new replica",
        )
        base = ok()
        await until(lambda: ok() >= base + 100, 120, "no recovery after the restart")
        stop.set()
        await task

    asyncio.run(load())
    statuses = Counter(a.status for a in answers)
    assert statuses[500] == 0, [a.body for a in answers if a.status == 500][:3]
    assert statuses[200] / len(answers) >= 0.999, (
        statuses,
        [a.body for a in answers if a.status != 200][:3],
    )
