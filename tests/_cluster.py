"""One real local Ray Serve cluster per test session, with the real model servers,
started by `servegraph run` (`make run`'s command) and shared by the integration and
reliability tiers (a plugin of tests/conftest.py, so both
folders get the same session fixtures, not one cluster each)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster, free_port
from servegraph.deploy.local_ray import (
    wait_until_running as wait_until_running,  # the tests' import
)
from servegraph.security.client import client_headers
from tests.otlp import OtlpReceiver

SPANS_DIR = tempfile.mkdtemp(prefix="servegraph-test-spans-")  # removed as pytest ends


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """Receives the cluster's spans over OTLP/HTTP, as a collector would."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@dataclass
class RunningPlatform:
    """The session's platform as `make run` starts it: `servegraph run` in a process of
    its own, and what it printed."""

    child: subprocess.Popen
    lines: list[str]
    cluster: LocalCluster

    @property
    def printed(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="session")
def servegraph_run(
    otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPlatform]:
    """`make run`'s command, `servegraph run`, starts the session's platform: its own
    local Ray, every model server and pipeline deployed, the knowledge base ingested. This
    process then joins that Ray as a driver (`servegraph.deploy.local_ray.attach`, as
    `servegraph batch --address` does), so tests deploy, call handles and read Serve's
    state as before. One platform start serves both `make run`'s test and the rest of
    the suite. At the end SIGTERM stops it, which must exit 0 and take the HTTP port with
    it (checked here: a failure shows as an error of the last test)."""
    from servegraph.deploy.local_ray import _prepare_environment, attach

    index_dir = tmp_path_factory.mktemp("index")  # pytest keeps the last 3 sessions'
    os.environ["SERVEGRAPH_INDEX_PATH"] = str(index_dir)
    # Every process of the cluster inherits these: spans go to files the tests read,
    # and over OTLP to the receiver.
    # (The standard OpenTelemetry variables; the receiver, like an authenticated
    # collector, takes only exports that carry its token.)
    os.environ["OTEL_TRACES_EXPORTER"] = "file,otlp"
    os.environ["SERVEGRAPH_TRACING_FILE_DIR"] = SPANS_DIR
    os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.url
    os.environ["OTEL_EXPORTER_OTLP_HEADERS"] = f"x-collector-token={otlp.token}"
    _prepare_environment()  # what the platform's processes get, in this driver too
    port, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",  # its progress lines as they come, through the pipe
        "COLUMNS": "200",  # rich wraps at 80 columns without a terminal
    }
    command = [str(Path(sys.executable).with_name("servegraph")), "run"]
    child = subprocess.Popen(
        [*command, "--port", str(port), "--dashboard-port", str(dashboard)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if "serving; Ctrl-C to stop" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    import ray

    try:
        deadline = time.monotonic() + 900
        while not serving.wait(1):
            assert child.poll() is None, "".join(lines[-40:])
            assert time.monotonic() < deadline, "".join(lines[-40:])
        found = re.search(r"^Ray: (\S+)", "".join(lines), re.MULTILINE)
        assert found, "".join(lines)
        attach(found.group(1))
        metrics_port = ray.nodes()[0]["MetricsExportPort"]
        running = RunningPlatform(
            child,
            lines,
            LocalCluster(
                base_url=f"http://127.0.0.1:{port}",
                dashboard_url=f"http://127.0.0.1:{dashboard}",
                http_port=port,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                gcs_address=found.group(1),
            ),
        )
    except BaseException:
        ray.shutdown()
        child.kill()  # Ray's processes go with it (Ray ties them to their parent)
        child.wait(timeout=60)
        raise
    try:
        yield running
    finally:
        try:
            ray.shutdown()
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                code = child.wait(timeout=180)
            except subprocess.TimeoutExpired:
                child.kill()
                raise
            reader.join(timeout=10)
    assert code == 0, "".join(lines[-40:])
    with pytest.raises(httpx.ConnectError):  # Serve's proxy went with the platform
        httpx.get(f"{running.cluster.base_url}/-/healthz", timeout=5)


@pytest.fixture(scope="session")
def cluster(servegraph_run: RunningPlatform) -> LocalCluster:
    return servegraph_run.cluster


@pytest.fixture(scope="session")
def model_servers(cluster: LocalCluster) -> LocalCluster:
    """Every model server deployed, healthy, and the ingress."""
    wait_until_running(["llm", "embedder", "classifier", "vector_index", "records"])
    return cluster


@pytest.fixture(scope="session")
def http(model_servers: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(
        headers=client_headers(), base_url=model_servers.base_url, timeout=120
    ) as client:
        yield client


@pytest.fixture(scope="session")
def pipelines(model_servers: LocalCluster) -> LocalCluster:
    """Every pipeline in `pipelines/` behind the ingress, knowledge base ingested
    (`servegraph run` did both)."""
    from servegraph.serving.ingress import INGRESS_APP

    wait_until_running([INGRESS_APP])
    return model_servers
