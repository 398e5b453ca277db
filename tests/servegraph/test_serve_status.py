"""`servegraph._serve_status`: the controller's details read into `serve.status()`'s
shape (what every caller reads of it), with Serve's own enums or their values."""

from __future__ import annotations

from ray.serve._private.common import DeploymentStatus, ReplicaState
from ray.serve.schema import ApplicationStatus

from servegraph._serve_status import AppState, DeploymentState, ServeState, state_of


def test_the_details_read_as_serve_status_reads_them() -> None:
    details = {
        "applications": {
            "embedder": {
                "status": ApplicationStatus.RUNNING,
                "message": "",
                "deployments": {
                    "Embedder": {
                        "status": DeploymentStatus.UPSCALING,
                        "message": "Upscaling from 1 to 2 replicas.",
                        "replicas": [
                            {"state": ReplicaState.RUNNING},
                            {"state": ReplicaState.STARTING},
                            {"state": "RUNNING"},
                        ],
                    }
                },
            },
            "llm": {"status": "DEPLOY_FAILED", "message": "no GPU", "deployments": {}},
        }
    }
    assert state_of(details) == ServeState(
        {
            "embedder": AppState(
                "RUNNING",
                "",
                {
                    "Embedder": DeploymentState(
                        "UPSCALING",
                        "Upscaling from 1 to 2 replicas.",
                        {"RUNNING": 2, "STARTING": 1},
                    )
                },
            ),
            "llm": AppState("DEPLOY_FAILED", "no GPU", {}),
        }
    )
    assert state_of({"applications": {}}) == state_of({}) == ServeState({})
