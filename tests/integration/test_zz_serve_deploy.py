"""The exported Serve config deploys with `serve deploy` (runs last: it replaces every
application of the session's cluster declaratively)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from servegraph.auth import client_headers
from servegraph.local_ray import LocalCluster
from tests._cluster import wait_until_running

pytestmark = pytest.mark.integration


def test_generated_config_deploys_with_serve_deploy(pipelines: LocalCluster, tmp_path: Path):
    from deployments.catalog import CATALOG
    from servegraph.discovery import discover
    from servegraph.planner import plan_platform

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
