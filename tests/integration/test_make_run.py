"""`make run`'s command, `servegraph run`, end to end: it starts its own local Ray,
deploys every model server and pipeline, prints the endpoints and serves until told to
stop. It is the session's platform (`tests._cluster.servegraph_run`): every integration
and reliability test runs against what it started, and at the session's end SIGTERM
must stop it with exit code 0, its HTTP port closed (checked by that fixture).

HAProxy as the ingress (`--ingress haproxy`, the option the rest of the suite does not
use) is checked on the smaller platform of tests/reliability/test_cluster_kill.py."""

from __future__ import annotations

import httpx
import pytest

from servegraph.security.client import client_headers
from tests._cluster import RunningPlatform

pytestmark = pytest.mark.integration


def test_servegraph_run_serves_every_pipeline_until_stopped(
    servegraph_run: RunningPlatform,
) -> None:
    from servegraph.lang.discovery import discover

    printed, base_url = servegraph_run.printed, servegraph_run.cluster.base_url
    assert "all applications RUNNING" in printed, printed
    for name in discover("pipelines"):
        assert f"{base_url}/pipelines/{name}" in printed, (name, printed)
    assert servegraph_run.child.poll() is None, "it stopped serving"
    answer = httpx.post(
        f"{base_url}/pipelines/rag",
        json={"question": "How long do refunds take after a return?", "max_tokens": 48},
        headers=client_headers(),
        timeout=120,
    )
    assert answer.status_code == 200 and answer.json()["answer"], answer.text
    keyless = httpx.post(f"{base_url}/pipelines/rag", json={}, timeout=30)
    assert keyless.status_code == 401, keyless.text
