"""Autoscaling really scales: the embedder grows under load and shrinks after, while the
classifier, another deployment, stays where it was."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from servegraph.auth import client_headers
from servegraph.local_ray import LocalCluster
from tests._cluster import wait_until_running

pytestmark = pytest.mark.integration

FAST_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1,
}


def running_replicas(app: str, deployment: str) -> int:
    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_embedder_scales_out_under_load_and_back_in(model_servers: LocalCluster) -> None:
    from deployments.embedder.server import app as embedder_app

    serve.run(
        embedder_app({"overrides": {"autoscaling_config": FAST_AUTOSCALING}}),
        name="embedder",
        route_prefix="/embedder",
    )
    wait_until_running(["embedder"])
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(
            headers=client_headers(), base_url=model_servers.base_url, timeout=60
        ) as client:
            deadline = time.monotonic() + 120  # bounded even if the test fails
            while not stop.is_set() and time.monotonic() < deadline:
                client.post("/embedder/embed", json={"texts": ["a support ticket"] * 32})

    workers = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    classifier_counts, peak = [], 1
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, running_replicas("embedder", "Embedder"))
            classifier_counts.append(running_replicas("classifier", "Classifier"))
            time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert peak == 2, "the embedder never scaled out under sustained load"

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and running_replicas("embedder", "Embedder") > 1:
        classifier_counts.append(running_replicas("classifier", "Classifier"))
        time.sleep(0.5)
    assert running_replicas("embedder", "Embedder") == 1, "the embedder never scaled back in"
    assert set(classifier_counts) == {1}, "the classifier moved while only the embedder was loaded"

    serve.run(embedder_app(), name="embedder", route_prefix="/embedder")  # profile defaults
    wait_until_running(["embedder"])
