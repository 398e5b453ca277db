"""`kill -9` of a model server's replica under load: pipelines, and the server's own REST
surface (its gateway), repeat the idempotent calls that were in flight on it, on the
restarted replica, within their deadlines."""

from __future__ import annotations

import uuid
from collections import Counter

import httpx
import pytest

from benchmarks.traffic import Answer, kill_under_load, replica_pids
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers

pytestmark = pytest.mark.reliability


def assert_nothing_lost(answers: list[Answer]) -> None:
    statuses = Counter(a.status for a in answers)
    assert statuses[500] == 0, [a.body for a in answers if a.status == 500][:3]
    assert statuses[200] / len(answers) >= 0.999, (
        statuses,
        [a.body for a in answers if a.status != 200][:3],
    )


@pytest.mark.parametrize(
    ("app", "deployment"), [("embedder", "Embedder"), ("vector_index", "VectorIndex")]
)
def test_killing_a_replica_under_pipeline_load_loses_no_request(
    pipelines: LocalCluster, app: str, deployment: str
) -> None:
    run = uuid.uuid4().hex[:8]

    def body(c: int, i: int) -> dict:
        text = f"Note {i} from caller {c}: the parcel arrives on a weekday."
        return {"documents": [{"id": f"{run}/c{c}/d{i}", "text": text, "metadata": {"run": run}}]}

    result = kill_under_load(
        pipelines.base_url,
        "/pipelines/rag_ingest",
        body,
        replicas=lambda: replica_pids(str(pipelines.dashboard_url), app, deployment),
        n=64,  # the callers' calls to the server are merged (servegraph.serving.merging)
        before=64,
        after=64,
        headers={"X-Request-Timeout": "60"},
    )
    assert_nothing_lost(result.answers)
    # Nothing acknowledged is lost: every document answered 200 is in the index.
    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=60) as client:
        stored = client.post("/index/count", json={"filter": {"run": run}}).json()["count"]
    assert stored == sum(a.status == 200 for a in result.answers)


def test_killing_a_replica_under_load_on_its_own_route_loses_no_request(
    pipelines: LocalCluster,
) -> None:
    result = kill_under_load(
        pipelines.base_url,
        "/embedder/embed_one",
        lambda c, i: {"text": f"ticket {c}-{i}: where is my parcel?"},
        replicas=lambda: replica_pids(str(pipelines.dashboard_url), "embedder", "Embedder"),
        n=16,
        before=100,
        after=100,
    )
    assert_nothing_lost(result.answers)
