"""A real Prometheus (Debian's package, `servegraph observe`) on the suite's cluster: it
finds every Ray node through Ray's service-discovery file, loads the alert rules, and
every query of the Grafana dashboard returns data after a small load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servegraph.cost.report import per_thousand
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from servegraph.telemetry.observe import prometheus
from servegraph.telemetry.versions import compare

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("servegraph"))
# Where the console's replicas look for Prometheus (set by tests/conftest.py).
PROMETHEUS_PORT = int(os.environ["SERVEGRAPH_PROMETHEUS_URL"].rsplit(":", 1)[1])


def dashboard_queries() -> dict[str, str]:
    dashboard = json.loads((ROOT / "dashboards" / "servegraph-grafana.json").read_text())
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }


def load(base_url: str) -> None:
    """A little of everything the dashboard charts: answers, an LLM call, a node error."""
    with httpx.Client(base_url=base_url, timeout=300, headers=client_headers()) as client:
        for question in ("How long do refunds take?", "How do I reset my password?"):
            assert client.post("/pipelines/rag", json={"question": question}).is_success
        triage = {"text": "Where is my order 12345?", "email": "ana@example.com"}
        assert client.post("/pipelines/triage", json=triage).is_success
        late = client.post(
            "/pipelines/rag",
            json={"question": "How long does delivery take?"},
            headers={"X-Request-Timeout": "0.01"},
        )
        assert late.status_code == 504


def test_prometheus_scrapes_every_node_loads_the_alerts_and_charts_every_panel(
    pipelines: LocalCluster,
) -> None:
    import ray

    discovery = Path(ray._private.worker._global_node.get_temp_dir_path())
    discovery /= "prom_metrics_service_discovery.json"
    with prometheus(
        port=PROMETHEUS_PORT,  # where the console's replicas look (tests/conftest.py)
        rules=ROOT / "dashboards" / "alerts.yaml",
        service_discovery=discovery,
    ) as prom:
        deadline = time.monotonic() + 120
        while not (targets := prom.targets()) or any(t["health"] != "up" for t in targets):
            assert time.monotonic() < deadline, f"targets not up: {targets}"
            time.sleep(1)
        nodes = {t["labels"]["instance"] for t in targets}
        assert nodes and {"servegraph-slo", "servegraph-llm"} <= set(prom.rule_groups())

        load(pipelines.base_url)
        queries = dashboard_queries()
        empty = dict(queries)
        deadline = time.monotonic() + 180  # a scrape, then a rule evaluation, then rates
        while empty and time.monotonic() < deadline:
            empty = {name: expr for name, expr in empty.items() if not prom.query(expr)}
            if empty:
                time.sleep(2)
        # `servegraph cost`: per 1,000 requests of each pipeline, from the same metrics.
        # A counter's first sample is where its increase starts, so: load once more now
        # that every series exists, and wait for a scrape of it.
        load(pipelines.base_url)
        costs: dict = {}
        deadline = time.monotonic() + 120
        while not {"rag", "triage"} <= set(costs) and time.monotonic() < deadline:
            costs = {row.pipeline: row for row in per_thousand(prom.query, "30m")}
            time.sleep(1)
        printed = subprocess.run(
            [CLI, "cost", "--prometheus", prom.url, "--window", "30m"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        # `servegraph versions`: the same requests per version (rag has one, v1), with
        # the 504 among them and its answers' signals.
        rows: list = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            rows and rows[0].deadline_miss_share > 0 and rows[0].signals
        ):
            rows = compare(prom.query, "rag", "30m")
            time.sleep(1)
        compared = subprocess.run(
            [CLI, "versions", "rag", "--prometheus", prom.url, "--window", "30m"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        # The console's model servers, from this Prometheus: replicas, queue and batch
        # sizes over the window for each deployment (its answer is kept 5 s).
        servers = _console_servers(pipelines.base_url)
    assert not empty, f"panels without data after load: {empty}"
    assert costs["rag"].usd_per_1000 > 0 and costs["triage"].wh_per_1000 > 0, costs
    assert costs["rag"].nodes_usd_per_1000["generate"] > costs["rag"].nodes_usd_per_1000["embed"]
    assert printed.returncode == 0 and "rag" in printed.stdout and "generate" in printed.stdout
    (v1,) = rows
    assert (v1.version, v1.role) == ("v1", "primary") and v1.requests >= 2, v1
    assert v1.p99_ms and v1.deadline_miss_share > 0 and "citations" in v1.signals, v1
    assert compared.returncode == 0 and "signal: citations" in compared.stdout, compared.stdout
    assert servers["prometheus"]["available"], servers["prometheus"]
    embedder = servers["prometheus"]["series"]["embedder/Embedder"]
    assert embedder["replicas"][-1][1] >= 1 and "queued" in embedder, embedder.keys()
    assert max(v for _, v in embedder["batch_size"]) >= 1, embedder
    print(f"{len(queries)} panel queries returned data; {len(targets)} targets up")


def _console_servers(base_url: str) -> dict:
    """The console's model servers once its Prometheus has the embedder's batch sizes."""
    with httpx.Client(base_url=base_url, timeout=60, headers=client_headers()) as client:
        deadline = time.monotonic() + 60
        while True:
            answer = client.get("/pipelines/console/api/servers", params={"window_s": 900})
            answer.raise_for_status()
            found = answer.json()
            series = found["prometheus"].get("series", {}).get("embedder/Embedder", {})
            if series.get("batch_size") or time.monotonic() > deadline:  # its first rate
                return found
            time.sleep(1)
