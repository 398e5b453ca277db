"""Batch before the hop, on the real platform: 64 concurrent callers through the
pipeline ingress reach the embedder and the index in a few handle calls carrying many
items each (counted by the replicas themselves, not timed)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from ray import serve

from benchmarks.traffic import callers, one_document
from servegraph._serve_status import serve_state
from servegraph.deploy.local_ray import LocalCluster

CALLERS, PER_CALLER = 64, 3


def counts(app: str, deployment: str) -> dict[str, dict[str, Any]]:
    """`call_counts()` of every running replica of `deployment`, by replica id: asked
    until every replica has answered (the router picks one per call)."""
    status = serve_state().applications[app].deployments[deployment]
    running = status.replica_states.get("RUNNING", 0)
    handle = serve.get_deployment_handle(deployment, app)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(200):
        answer = handle.call_counts.remote().result()
        seen[answer["replica"]] = answer
        if len(seen) >= running:
            return seen
    raise AssertionError(f"{len(seen)} of {running} replicas answered")


def test_64_concurrent_callers_reach_each_server_in_a_quarter_as_many_calls(
    pipelines: LocalCluster,
) -> None:
    servers = [("embedder", "Embedder"), ("vector_index", "VectorIndex")]
    before = {s: counts(*s) for s in servers}
    run = uuid.uuid4().hex[:8]
    answers = asyncio.run(
        callers(
            pipelines.base_url,
            "/pipelines/rag_ingest",
            one_document(run, "the parcel arrives on a weekday."),
            n=CALLERS,
            stop=asyncio.Event(),
            max_requests=CALLERS * PER_CALLER,
            max_seconds=300,
            max_per_caller=PER_CALLER,
            headers={"X-Request-Timeout": "120"},
        )
    )
    assert Counter(a.status for a in answers) == {200: CALLERS * PER_CALLER}
    for server in servers:
        after = counts(*server)
        calls = sum(
            a["calls"] - before[server].get(r, {}).get("calls", 0) for r, a in after.items()
        )
        items = sum(
            a["items"] - before[server].get(r, {}).get("items", 0) for r, a in after.items()
        )
        assert items >= CALLERS * PER_CALLER, (server, items)
        assert calls <= items / 4, (server, calls, items)
