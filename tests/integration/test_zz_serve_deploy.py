"""The exported Serve config deploys with `serve deploy` (runs last: it replaces every
application of the session's cluster declaratively)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from tests._cluster import wait_until_running
from tests.otlp import OtlpReceiver, ingress_span

pytestmark = pytest.mark.integration


def test_generated_config_deploys_with_serve_deploy(
    pipelines: LocalCluster, tmp_path: Path, otlp: OtlpReceiver
) -> None:
    from deployments.catalog import CATALOG
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover

    plan = plan_platform(discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True)
    # The apps are built in Serve's controller, not here: hand it this session's index.
    config = plan.serve_config(
        port=pipelines.http_port, env={"SERVEGRAPH_INDEX_PATH": os.environ["SERVEGRAPH_INDEX_PATH"]}
    )
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve_cli = Path(sys.executable).with_name("serve")
    subprocess.run(
        [str(serve_cli), "deploy", str(path), "-a", pipelines.dashboard_url],
        check=True,
        timeout=120,
    )
    wait_until_running([app["name"] for app in config["applications"]])
    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=180) as client:
        body = client.post(
            "/pipelines/rag_yaml",
            json={"question": "How long is the reset link for a password valid?"},
        ).json()
        assert any("30 minutes" in p["text"] for p in body["passages"]), body
        listed = {p["name"] for p in client.get("/pipelines/").json()["pipelines"]}
        assert {"rag", "rag_yaml", "rag_ingest", "triage"} <= listed

        # Tracing came with the config: a request's trace reaches the OTLP receiver
        # from the ingress (Serve's proxy, or the ingress replica behind HAProxy), the
        # pipeline's nodes and the model servers' replicas.
        assert config["tracing_config"]["enabled"]
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
