"""One real local Ray Serve cluster per test session, with the real model servers,
shared by the integration and reliability tiers (a plugin of tests/conftest.py, so both
folders get the same session fixtures, not one cluster each)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster, local_cluster
from servegraph.deploy.local_ray import (
    wait_until_running as wait_until_running,  # the tests' import
)
from servegraph.security.client import client_headers
from tests.otlp import OtlpReceiver

SPANS_DIR = tempfile.mkdtemp(prefix="servegraph-test-spans-")


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """Receives the cluster's spans over OTLP/HTTP, as a collector would."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def cluster(otlp: OtlpReceiver) -> Iterator[LocalCluster]:
    index_dir = tempfile.mkdtemp(prefix="servegraph-test-index-")
    os.environ["SERVEGRAPH_INDEX_PATH"] = index_dir
    # Every process of the cluster inherits these: spans go to files the tests read,
    # and over OTLP to the receiver.
    # (The standard OpenTelemetry variables; the receiver, like an authenticated
    # collector, takes only exports that carry its token.)
    os.environ["OTEL_TRACES_EXPORTER"] = "file,otlp"
    os.environ["SERVEGRAPH_TRACING_FILE_DIR"] = SPANS_DIR
    os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.url
    os.environ["OTEL_EXPORTER_OTLP_HEADERS"] = f"x-collector-token={otlp.token}"
    with local_cluster() as running:
        yield running


@pytest.fixture(scope="session")
def model_servers(cluster: LocalCluster) -> LocalCluster:
    """Every model server deployed, healthy, and the ingress (no pipelines yet)."""
    from deployments.catalog import CATALOG
    from servegraph.deploy.planner import plan_platform

    plan_platform([], CATALOG, all_servers=True).deploy()
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
    """Every pipeline in `pipelines/` behind the ingress, knowledge base ingested."""
    from deployments.catalog import CATALOG
    from pipelines.rag.ingest import on_deploy
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover
    from servegraph.serving.ingress import INGRESS_APP

    plan = plan_platform(discover("pipelines"), CATALOG, packages=["pipelines"])
    plan.apps = [app for app in plan.apps if app.name == INGRESS_APP]  # servers are up
    plan.deploy()
    wait_until_running([INGRESS_APP])
    on_deploy(model_servers.base_url)
    return model_servers
