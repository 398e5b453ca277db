"""What operators see: the Ray dashboard lists every deployment with its settings."""

from __future__ import annotations

import pytest

from servegraph.deploy.local_ray import LocalCluster

pytestmark = pytest.mark.integration


def test_dashboard_shows_every_deployment_and_the_ingress_takes_many_requests(
    pipelines: LocalCluster,
) -> None:
    # The client `serve status/deploy` use; it sends Ray's dashboard auth token.
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(pipelines.dashboard_url).get_serve_details()
    apps = details["applications"]
    deployments = {
        name: deployment for app in apps.values() for name, deployment in app["deployments"].items()
    }
    assert {"Embedder", "Classifier", "VectorIndex", "Gateway", "PipelineIngress"} <= set(
        deployments
    )
    assert any(name.startswith("LLMServer:") for name in deployments)
    assert all(app["status"] == "RUNNING" for app in apps.values()), apps
    # Serve's default of 5 ongoing requests would queue the sixth pipeline request at
    # the proxy; the ingress only awaits model servers, so it takes many at once.
    ingress = deployments["PipelineIngress"]["deployment_config"]
    assert ingress["max_ongoing_requests"] == 256 and ingress["max_queued_requests"] == 256
    # Every deployment of the platform refuses past a bounded queue (503 + Retry-After)
    # rather than queueing without bound.
    ours = {"Embedder", "Classifier", "VectorIndex", "Gateway", "PipelineIngress"}
    for name, deployment in deployments.items():
        if name in ours or name.startswith("LLMServer:"):
            config = deployment["deployment_config"]
            assert config["max_queued_requests"] > 0, name
            assert config["backpressure_config"]["retry_after_s"] == 1, name
