"""What must hold across several ingress replicas, on an ingress of two (deployed once
for this module, then put back): a key's rate limit is one limit, not one per replica;
a traffic split between a pipeline's versions reaches every replica, while callers
keep calling and none of their requests fails; and a rollout to a version with an
injected fault, judged from a real Prometheus, rolls back at its first step naming
the gate."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.rollout import faulty_probe, probe_load, prometheus_on_the_cluster
from benchmarks.versions import probe
from servegraph._serve_status import serve_state
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from tests._cluster import wait_until_running
from tests.integration.test_auth import bearer, replicas_of, store, wait_for_series

pytestmark = pytest.mark.integration


def version_series(**labels: str) -> str:
    """A pattern for the probe's `servegraph_version_requests` lines with `labels`, in
    whatever order the exporter writes them."""
    wanted = {"pipeline": "versions_probe", **labels}
    return r"servegraph_version_requests(_total)?\{" + "".join(
        rf'(?=[^}}]*{name}="{value}")' for name, value in wanted.items()
    )


def replica_states() -> dict[str, int]:

    from servegraph.serving.ingress import INGRESS_APP

    app = serve_state().applications[INGRESS_APP]
    return dict(app.deployments["PipelineIngress"].replica_states)


def settle(running: int) -> None:
    """Wait, bounded, until exactly `running` replicas run, none starting or stopping
    (a redeploy replaces them: a new code version)."""
    deadline = time.monotonic() + 120
    while replica_states() != {"RUNNING": running}:
        assert time.monotonic() < deadline, f"the ingress did not settle: {replica_states()}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def two_replicas(pipelines: LocalCluster) -> Iterator[LocalCluster]:
    from deployments.catalog import CATALOG
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover
    from servegraph.lang.serialize import from_yaml
    from servegraph.serving.ingress import INGRESS_APP

    def deploy(graphs: list, packages: list[str] | None, **deployment: object) -> None:
        plan = plan_platform(graphs, CATALOG, packages=packages, ingress_deployment=deployment)
        plan.apps = [app for app in plan.apps if app.name == INGRESS_APP]
        plan.deploy()
        wait_until_running([INGRESS_APP])

    shipped = list(discover("pipelines").values())
    # The graphs travel as YAML (no package), the probe's versions with them: v3 fails
    # a fifth of its calls.
    probes = [from_yaml(probe("v1")), from_yaml(probe("v2")), faulty_probe()]
    deploy([*shipped, *probes], None, num_replicas=2)
    try:
        settle(2)
        yield pipelines
    finally:
        deploy(shipped, ["pipelines"])
        # Back to one replica, the old ones gone: a later test's requests (and their
        # metrics) must not land on a replica that is shutting down.
        settle(1)


def test_a_keys_rate_limit_is_shared_by_two_ingress_replicas(two_replicas: LocalCluster) -> None:
    # One request per 1,000 s: a bucket of one. Limited per replica, two replicas would
    # admit two.
    key = store().create("it-limited", ["invoke:*"], requests_per_s=0.001)
    answers: list[httpx.Response] = []

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=two_replicas.base_url, timeout=60, headers=bearer(key)
        ) as client:
            return await asyncio.gather(*(client.get("/pipelines/rag/graph") for _ in range(60)))

    # Both replicas must answer some: each exports its own series of the key's
    # requests. Serve's router may send a whole burst to one replica (seen in a full
    # run: all 60 to the replica started 2 s before, none to the other), so burst
    # again, bounded, until both have.
    deadline = time.monotonic() + 120
    while True:
        answers += asyncio.run(burst())
        series = wait_for_series(
            two_replicas,
            r'servegraph_key_requests(_total)?\{[^}]*key="it-limited"',
            enough=lambda found: len(replicas_of(found)) >= 2,
            timeout_s=15,
        )
        if len(replicas_of(series)) >= 2 or time.monotonic() > deadline:
            break
    # Serve's own count of each replica's requests, to tell "one replica answered them
    # all" from "a replica's usage was not exported" if the above fails.
    served = wait_for_series(
        two_replicas,
        r"serve_deployment_request_counter(_total)?\{[^}]*PipelineIngress",
        timeout_s=1,
    )
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 1 and statuses.count(429) == len(answers) - 1, statuses
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
    assert len(replicas_of(series)) == 2, (series, served)


def test_a_traffic_split_reaches_every_replica_under_load_and_fails_no_request(
    two_replicas: LocalCluster,
) -> None:
    """Twenty callers call the probe while its traffic moves from v1 to v2; the move is
    seen on both replicas (each exports its own series of v2's requests), no request
    fails, and every answer names its version. Then a shadow share, and a pin."""
    route = "/pipelines/versions_probe"
    traffic = f"{route}/traffic"

    def traffic_cli(*args: str) -> subprocess.CompletedProcess[str]:
        """`servegraph traffic versions_probe ...` as an operator types it."""
        command = [sys.executable, "-m", "servegraph.cli", "traffic", "versions_probe"]
        return subprocess.run(
            [*command, *args, "--url", two_replicas.base_url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )

    wrong = traffic_cli("--weights", "v1=50,v2=20")
    assert wrong.returncode == 2 and "sum to 70" in wrong.stdout, wrong.stdout + wrong.stderr
    unknown = traffic_cli("--weights", "v1=50,v7=50")
    assert unknown.returncode == 2 and "weights.v7" in unknown.stdout, unknown.stdout
    answers: list[tuple[float, float, int, str]] = []  # (sent, received, status, version)

    async def call(client: httpx.AsyncClient, n: int) -> None:
        sent = time.monotonic()
        answer = await client.post(route, json={"question": f"question {n}"})
        version = answer.headers.get("x-pipeline-version", "")
        answers.append((sent, time.monotonic(), answer.status_code, version))

    async def scenario() -> tuple[float, float]:
        stop = asyncio.Event()
        async with httpx.AsyncClient(
            base_url=two_replicas.base_url, headers=client_headers(), timeout=60
        ) as client:

            async def caller(k: int) -> None:
                n = 0
                while not stop.is_set() and n < 2_000:  # bounded
                    await call(client, k * 10_000 + n)
                    n += 1

            callers = [asyncio.create_task(caller(k)) for k in range(20)]
            try:
                deadline = time.monotonic() + 60
                while len(answers) < 100 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert len(answers) >= 100, f"the callers made {len(answers)} calls in 60 s"
                asked = time.monotonic()
                moved = await asyncio.to_thread(traffic_cli, "--weights", "v1=0,v2=100")
                assert moved.returncode == 0, moved.stdout + moved.stderr
                acknowledged = time.monotonic()
                # Until the last 200 requests sent after the move were all answered by
                # v2: every replica has it (bounded).
                deadline = acknowledged + 60
                while time.monotonic() < deadline:
                    later = [a for a in answers if a[0] > acknowledged]
                    if len(later) >= 200 and all(a[3] == "v2" for a in later[-200:]):
                        break
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await asyncio.gather(*callers)
        return asked, acknowledged

    asked, acknowledged = asyncio.run(scenario())
    statuses = {a[2] for a in answers}
    assert statuses == {200}, statuses
    assert all(a[3] in ("v1", "v2") for a in answers)
    before = [a for a in answers if a[1] < asked]
    assert before and all(a[3] == "v1" for a in before)  # the default, until moved
    later = [a for a in answers if a[0] > acknowledged]
    assert len(later) >= 200 and all(a[3] == "v2" for a in later[-200:]), later[-200:]
    late_v1 = [a[0] - acknowledged for a in answers if a[3] == "v1" and a[0] > acknowledged]
    print(
        f"\n{len(answers)} requests, all 200; the last v1 answer was sent "
        f"{max(late_v1, default=0.0):.2f} s after the move was acknowledged"
    )
    series = wait_for_series(
        two_replicas,
        version_series(role="primary", version="v2"),
        enough=lambda found: len(replicas_of(found)) >= 2,
        timeout_s=30,
    )
    assert len(replicas_of(series)) == 2, series

    with httpx.Client(
        base_url=two_replicas.base_url, headers=client_headers(), timeout=60
    ) as client:
        shadowed = {"weights": {"v1": 100}, "shadow": "v2", "shadow_percent": 100}
        assert client.put(traffic, json=shadowed).status_code == 200
        # The replica that took the PUT applies it at once, the other at its next read
        # of the board (`REFRESH_S`): until then it still answers with v2.
        versions: list[str] = []
        deadline = time.monotonic() + 30
        while versions[-10:] != ["v1"] * 10 and time.monotonic() < deadline:
            answer = client.post(route, json={"question": f"shadowed {len(versions)}"})
            assert answer.status_code == 200, answer.text
            versions.append(answer.headers["x-pipeline-version"])
        assert versions[-10:] == ["v1"] * 10, versions
        shadows = wait_for_series(
            two_replicas,
            version_series(role="shadow", status="200", version="v2"),
            timeout_s=30,
        )
        assert shadows, "no shadow run was recorded"
        pinned = client.post(
            route, json={"question": "pinned"}, headers={"x-pipeline-version": "v2"}
        )
        assert pinned.status_code == 200, pinned.text
        assert pinned.headers["x-pipeline-version"] == "v2"
        unknown = client.post(
            route, json={"question": "pinned"}, headers={"x-pipeline-version": "v7"}
        )
        assert unknown.status_code == 404 and unknown.json()["versions"] == ["v1", "v2", "v3"]
    shown = traffic_cli("--clear")
    assert shown.returncode == 0 and "v1" in shown.stdout and "100" in shown.stdout, shown.stdout


def test_a_rollout_to_a_faulty_version_rolls_back_at_its_first_step_naming_the_gate(
    two_replicas: LocalCluster, tmp_path: Path
) -> None:
    """`servegraph rollout` as an operator runs it, under ten callers, against a real
    Prometheus: v3 fails a fifth of its calls, so the error gate fails at the first
    step (5 %) once each version has ten requests in Prometheus; the split goes back
    to v1, and `rollout status` says which step failed and why."""

    def rollout(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "servegraph.cli", "rollout", *args]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "COLUMNS": "200", "SERVEGRAPH_HOME": str(tmp_path)},
        )

    url = ["--url", two_replicas.base_url]
    wrong = rollout("versions_probe", "--to", "v3", "--gate", "helpfulness>=0.9x", *url)
    assert wrong.returncode == 2 and "--gate" in wrong.stdout, wrong.stdout + wrong.stderr
    assert "'helpfulness' is neither a figure nor an answer signal" in wrong.stdout
    with prometheus_on_the_cluster() as prometheus, probe_load(two_replicas.base_url, 10):
        ran = rollout(
            "versions_probe",
            "--to",
            "v3",
            "--steps",
            "5,50,100",
            "--hold",
            "60s",
            "--max-hold",
            "240s",
            "--interval",
            "2s",
            "--min-requests",
            "10",
            "--gate",
            "errors<=+0.05",
            "--prometheus",
            prometheus,
            *url,
        )
    said = ran.stdout + ran.stderr
    assert ran.returncode == 1, said
    assert "versions_probe: rolled back: gate errors<=+0.05: v3 " in said, said
    assert "at 5 %" in said and "FAIL" in said, said
    with httpx.Client(
        base_url=two_replicas.base_url, headers=client_headers(), timeout=60
    ) as client:
        split = client.get("/pipelines/versions_probe/traffic").json()["split"]
    assert {v: w for v, w in split["weights"].items() if w} == {"v1": 100}, split
    status = rollout("status", "versions_probe")
    assert status.returncode == 0 and "rolled back" in status.stdout, status.stdout
    assert "5 %" in status.stdout and "failed" in status.stdout, status.stdout
    assert "to come" in status.stdout  # 50 % and 100 % never started
    print(f"\n{said}")
