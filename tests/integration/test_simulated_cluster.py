"""The whole platform on a simulated multi-node cluster shaped like `cluster.yaml` (issue 16).

Several raylets on this machine (`servegraph.deploy.local_ray.simulated_cluster`): the head type
and two of its GPU worker type (of `max_workers: 4`), each with the resources
`cluster.yaml` declares, one logical GPU per worker included. The platform deploys with
the GPU profile's asks (`SERVEGRAPH_PROFILE=gpu`), so Ray's placement is the real one:
an encoder's 0.1 GPU and the LLM's 0.6 GPU placement group can only land on a worker.
Only the engines differ from a GPU cluster: the encoders find no CUDA and run on the
CPU, and vLLM runs on the CPU while its placement group keeps the GPU share
(`SERVEGRAPH_LLM_ENGINE_DEVICE=cpu`). Ray runs with token authentication, as on
`cluster.yaml`'s nodes (issue 24). It is deployed as on a real cluster: the plan's
Serve config handed to `serve deploy` through the dashboard.

These tests run first in the session (tests/conftest.py orders them), before the
session's own cluster starts: this machine holds one platform's models at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.traffic import Answer, callers, one_document, until
from servegraph._serve_status import serve_state
from servegraph.deploy.capacity.inputs import HEAD_RESOURCE, NodeType, node_types
from servegraph.deploy.local_ray import SimulatedCluster, SimulatedNode, simulated_cluster
from servegraph.security.client import client_headers
from tests._cluster import wait_until_running
from tests.otlp import OtlpReceiver, ingress_span

pytestmark = pytest.mark.own_cluster

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2  # cluster.yaml's GPU worker type, scaled down from its max_workers of 4
GPU_DEPLOYMENTS = {"Embedder", "Classifier", "LLMServer"}  # the ones asking for a GPU share
ON_HEAD = {"VectorIndex", "SupportRecords", "PipelineIngress", "Gateway", "GuardedIngress"}


def shape() -> tuple[SimulatedNode, list[SimulatedNode]]:
    """cluster.yaml's head, and `WORKERS` of its GPU worker type."""
    types = node_types(ROOT / "cluster.yaml")
    head = next(t for t in types if HEAD_RESOURCE in t.resources)
    gpu = next(t for t in types if t.resources.get("GPU"))
    return _node(head), [_node(gpu)] * WORKERS


def _node(node_type: NodeType) -> SimulatedNode:
    resources = {k: v for k, v in node_type.resources.items() if k != HEAD_RESOURCE}
    return SimulatedNode(node_type.name, resources)


@pytest.fixture(scope="module")
def sim(otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedCluster]:
    """The platform deployed as an operator deploys it onto a cluster: the plan written
    as a Serve config and handed to `serve deploy` through the dashboard, once the
    capacity check says it fits. Tracing is on, exported over OTLP to the suite's
    receiver, with the exporter's settings in the nodes' environment as `cluster.yaml`
    sets them."""
    from deployments.catalog import CATALOG
    from pipelines.rag.ingest import on_deploy
    from servegraph.deploy.capacity.inputs import asks_of, running_node_types
    from servegraph.deploy.capacity.search import check
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover

    head, workers = shape()
    settings = {
        "SERVEGRAPH_PROFILE": "gpu",
        "SERVEGRAPH_LLM_ENGINE_DEVICE": "cpu",
        "SERVEGRAPH_ROUTER_RESOURCES": json.dumps({HEAD_RESOURCE: 0.001}),
        "SERVEGRAPH_INDEX_PATH": str(tmp_path_factory.mktemp("sim-index")),
    }
    with pytest.MonkeyPatch.context() as env:
        for name, value in settings.items():
            env.setenv(name, value)
        env.setenv("OTEL_TRACES_EXPORTER", "otlp")
        env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
        env.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-collector-token={otlp.token}")
        with simulated_cluster(head, workers, dashboard=True) as running:
            assert running.dashboard_url, "the dashboard did not start"
            plan = plan_platform(
                discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True
            )
            verdict = check(asks_of(plan), running_node_types())
            assert verdict.ok, verdict.never or verdict.unplaced
            config = plan.serve_config(port=running.http_port, env=settings)
            assert config["tracing_config"]["enabled"]
            path = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            serve_deploy(path, running.dashboard_url)
            wait_until_running([app["name"] for app in config["applications"]])
            on_deploy(running.base_url)
            yield running


def serve_deploy(config: Path, dashboard_url: str) -> None:
    """`serve deploy CONFIG -a DASHBOARD`, as an operator types it (the token comes from
    this process's RAY_AUTH_TOKEN_PATH, as on a node). The dashboard's Serve module may
    still be starting when the cluster is up: retried, bounded, until it takes the
    config."""
    command = [str(Path(sys.executable).with_name("serve")), "deploy", str(config)]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            [*command, "-a", dashboard_url], capture_output=True, text=True, timeout=120
        )
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(1)


def test_ray_on_the_simulated_cluster_refuses_callers_without_its_token(
    sim: SimulatedCluster,
) -> None:
    """Ray's control plane runs with token authentication, as on `cluster.yaml`'s nodes
    (issue 24): the dashboard's job API, where a submitted job runs any code as the Ray
    user, answers 401 without the token and 403 with a wrong one, and works with it."""
    assert sim.dashboard_url
    jobs = f"{sim.dashboard_url}/api/jobs/"
    submission = {"entrypoint": "echo not-authenticated"}
    wrong = {"authorization": "Bearer " + "0" * 64}
    with httpx.Client(timeout=30) as client:
        assert client.post(jobs, json=submission).status_code == 401
        assert client.post(jobs, json=submission, headers=wrong).status_code == 403
        assert client.get(jobs).status_code == 401
        assert client.get(jobs, headers=wrong).status_code == 403

        def listed() -> bool:  # the job module may still be starting: 5xx until then
            return client.get(jobs, headers=sim.auth_headers()).status_code == 200

        _wait_for(listed, 60)
        answer = client.get(jobs, headers=sim.auth_headers()).json()
    assert not [job for job in answer if job.get("type") == "SUBMISSION"], answer


def test_what_serve_deploy_built_serves_every_pipeline_and_traces_a_request(
    sim: SimulatedCluster, otlp: OtlpReceiver
) -> None:
    """What `serve deploy` built from the generated config (the fixture) answers: the
    YAML pipeline with the shipped knowledge base, every pipeline listed; and a
    request's trace reaches the OTLP receiver from the proxy, the pipeline's nodes and a
    model server's replica: tracing came with the config."""
    with httpx.Client(headers=client_headers(), base_url=sim.base_url, timeout=180) as client:
        body = client.post(
            "/pipelines/rag_yaml",
            json={"question": "How long is the reset link for a password valid?"},
        ).json()
        assert any("30 minutes" in p["text"] for p in body["passages"]), body
        listed = {p["name"] for p in client.get("/pipelines/").json()["pipelines"]}
        assert {"rag", "rag_yaml", "rag_ingest", "triage"} <= listed

        trace_id = secrets.token_hex(16)
        traced = client.post(
            "/pipelines/rag",
            json={"question": "How long do refunds take?"},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
        assert traced.is_success and traced.headers["x-trace-id"] == trace_id
    wanted = {"node embed", "node retrieve", "node generate"}

    def complete(spans: list[dict]) -> bool:
        named = {s["name"] for s in spans}
        names = {n.split(" PipelineIngress")[0] for n in named}
        replica = any(n.startswith("replica_handle_request Embedder") for n in names)
        return wanted <= names and replica and any(n.startswith(ingress_span()) for n in named)

    spans = otlp.trace(trace_id, until=complete)
    assert complete(spans), sorted({s["name"] for s in spans})
    assert otlp.refused == 0  # every export carried the collector's token


@dataclass(frozen=True)
class Replica:
    deployment: str  # the deployment's class, e.g. "Embedder", "LLMServer"
    state: str
    node_id: str | None


def replicas() -> list[Replica]:
    """Every replica with its state and node, as Serve's controller reports them (the
    dashboard's source)."""
    from ray import serve

    details = serve.context._get_global_client().get_serve_details()
    return [
        Replica(name.split(":")[0], str(replica["state"]).split(".")[-1], replica.get("node_id"))
        for app in details["applications"].values()
        for name, deployment in app["deployments"].items()
        for replica in deployment["replicas"]
    ]


def test_every_replica_lands_where_its_resources_say_and_the_pipelines_answer(
    sim: SimulatedCluster,
) -> None:
    placed = replicas()
    for replica in placed:
        where = sim.node_kind(replica.node_id) if replica.node_id else "pending"
        if replica.deployment in GPU_DEPLOYMENTS:
            assert where == "worker_gpu", replica
        else:
            assert replica.deployment in ON_HEAD and where == "head_cpu", replica
    kinds = [r.deployment for r in placed]
    assert kinds.count("Embedder") == 2 and kinds.count("Classifier") == 2  # GPU profile

    with httpx.Client(base_url=sim.base_url, headers=client_headers(), timeout=180) as client:
        rag = client.post("/pipelines/rag", json={"question": "How long do refunds take?"})
        assert rag.status_code == 200, rag.text
        assert rag.json()["citations"], rag.json()
        triage = client.post(
            "/pipelines/triage", json={"text": "Where is my order 12345? It has not arrived."}
        )
        assert triage.status_code == 200, triage.text
        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8,
            },
        )
        assert chat.status_code == 200, chat.text


def test_losing_a_gpu_worker_under_load_loses_no_request_and_no_document(
    sim: SimulatedCluster,
) -> None:
    """A GPU worker goes away (as a cloud takes a node, every process on it at once)
    while callers ingest documents and ask questions. Its encoder replicas come back on
    the surviving worker; the pipelines' calls to the dead replicas are repeated there
    within their deadlines; every acknowledged document is in the index (on the head)."""
    placed = replicas()
    llm_nodes = {r.node_id for r in placed if r.deployment == "LLMServer"}
    victim = max(
        (n for n in sim.nodes["worker_gpu"] if n.node_id not in llm_nodes),
        key=lambda n: sum(r.node_id == n.node_id for r in placed),
    )
    lost_replicas = [r.deployment for r in placed if r.node_id == victim.node_id]
    assert lost_replicas, "the worker to remove hosts no replica: nothing would be tested"
    run = uuid.uuid4().hex[:8]
    ingested: list[Answer] = []
    asked: list[Answer] = []
    removed_at: list[float] = []

    def healthy_again() -> bool:
        """Serve has seen the replicas go, and runs two of each encoder elsewhere."""
        now = replicas()
        if any(r.node_id == victim.node_id for r in now):
            return False
        running = [r.deployment for r in now if r.state == "RUNNING"]
        return running.count("Embedder") >= 2 and running.count("Classifier") >= 2

    async def scenario() -> float:
        stop = asyncio.Event()
        load = asyncio.gather(
            callers(
                sim.base_url,
                "/pipelines/rag_ingest",
                one_document(run, "parcels to Oslo take 4 days."),
                n=6,
                stop=stop,
                max_requests=3_000,
                max_seconds=300,
                answers=ingested,
            ),
            callers(
                sim.base_url,
                "/pipelines/rag",
                lambda c, i: {"question": "How long do refunds take?", "max_tokens": 48},
                n=2,
                stop=stop,
                max_requests=500,
                max_seconds=300,
                answers=asked,
            ),
        )
        await until(lambda: sum(a.status == 200 for a in ingested) >= 30, 120, "30 ingests")
        removed_at.append(time.monotonic())
        await asyncio.to_thread(sim.remove, victim)
        await until(healthy_again, 240, "encoders back to 2 replicas each")
        recovered = time.monotonic() - removed_at[0]
        after = len(ingested)
        await until(lambda: len(ingested) >= after + 30, 120, "30 more ingests after recovery")
        stop.set()
        await load
        return recovered

    recovered_s = asyncio.run(scenario())
    answers = ingested + asked
    statuses: dict[int, int] = {}
    for answer in answers:
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
    # Only successes, or refusals a client is told to retry: never a 500, never silence.
    assert set(statuses) <= {200, 503}, statuses
    assert all(a.headers and "retry-after" in a.headers for a in answers if a.status == 503)
    success = statuses.get(200, 0) / len(answers)

    acknowledged = [a.body["documents"][0]["id"] for a in ingested if a.status == 200]
    with httpx.Client(base_url=sim.base_url, headers=client_headers(), timeout=60) as client:
        lost = [
            doc_id
            for doc_id in acknowledged
            if client.post("/index/count", json={"filter": {"doc_id": doc_id}}).json()["count"] != 1
        ]
    print(
        f"\nworker removal: {len(answers)} requests, success {success:.1%}, statuses "
        f"{statuses}, replicas lost {sorted(lost_replicas)}, encoders back after "
        f"{recovered_s:.1f} s, ingest p99 {_p99(ingested):.2f} s, rag p99 {_p99(asked):.2f} s, "
        f"acknowledged {len(acknowledged)}, lost {len(lost)}"
    )
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged documents lost"
    assert success >= 0.99, statuses


def _p99(answers: list[Answer]) -> float:
    seconds = sorted(a.seconds for a in answers)
    return seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] if seconds else 0.0


def test_a_node_with_other_model_files_fails_its_replicas_health_check_naming_both_nodes(
    sim: SimulatedCluster, tmp_path: Path
) -> None:
    """A node whose set-up left different files under the model path (here: the
    embedder's folder with one byte more in its README) joins; a replica placed there
    loads them, and its health check fails with a message naming its node and the node
    the application was built on."""
    from ray import serve

    from deployments.embedder.model import EmbedderSettings
    from deployments.embedder.server import app

    stale = tmp_path / "embedder"
    shutil.copytree(EmbedderSettings().model_dir, stale)
    with (stale / "README.md").open("a") as readme:
        readme.write("\n")
    raylet = sim.add(
        SimulatedNode("worker_stale", {"CPU": 2.0, "GPU": 1.0}),
        env={"SERVEGRAPH_EMBEDDER_PATH": str(stale)},
    )
    pinned = {"num_cpus": 1, "resources": {"worker_stale": 0.5}}
    overrides = {"num_replicas": 1, "ray_actor_options": pinned}
    try:
        with contextlib.suppress(RuntimeError):  # serve.run raises when the deploy fails
            serve.run(
                app({"overrides": overrides}),
                name="embedder_stale",
                route_prefix="/embedder_stale",
                blocking=False,
            )
        _wait_for(lambda: "model mismatch" in _status_text("embedder_stale"), 240)
        message = _status_text("embedder_stale")
        head = sim.nodes["head_cpu"][0].node_id
        assert raylet.node_id[:12] in message and head[:12] in message, message
    finally:
        serve.delete("embedder_stale")


def _status_text(app_name: str) -> str:

    status = serve_state().applications.get(app_name)
    if status is None:
        return ""
    return " ".join(
        [status.message] + [d.message for d in status.deployments.values() if d.message]
    )


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s} s")
        time.sleep(0.5)
