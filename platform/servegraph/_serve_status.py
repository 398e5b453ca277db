"""Serve's status as its controller reports it, in the shape `serve.status()` gives,
without what `serve.status()` costs.

`serve.status()` (Serve's public API) validates the controller's whole details into
pydantic models first, and in Ray 2.60 each deployment's `RequestRouterConfig`
cloudpickles its router class on the way, which walks every module the process has
imported. In a process holding what the test suite imports (6,959 modules), with the
platform's 12 applications running, a call cost 0.19 CPU-s, against 0.001 CPU-s for the
same details as the dict the controller sends (`get_serve_details`, what
`serve.status()` validates); a driver polling it once a second while the platform
started spent 17.7 CPU-s in all, 10.2 with this. So this reads the dict: by hand,
because Serve has no cheaper public call. Its fields are those of
`ray.serve.schema.ServeInstanceDetails`, read as `ServeInstanceDetails._get_status`
reads them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeploymentState:
    status: str
    message: str = ""
    replica_states: dict[str, int] = field(default_factory=dict)  # state -> replicas


@dataclass(frozen=True)
class AppState:
    status: str
    message: str = ""
    deployments: dict[str, DeploymentState] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeState:
    applications: dict[str, AppState] = field(default_factory=dict)


def serve_details() -> dict[str, Any]:
    """The controller's details of every application, as `serve.status()` receives
    them: empty when this process is not on Ray (where `serve.status()` would start a
    Ray of its own) or Serve has not started."""
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        return {"applications": {}}
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {"applications": {}}
    details: dict[str, Any] = client.get_serve_details()
    return details


def serve_state() -> ServeState:
    """What `serve.status()` says of the applications, at a small part of its CPU."""
    return state_of(serve_details())


def state_of(details: dict[str, Any]) -> ServeState:
    """`details` (`serve_details`) in `serve.status()`'s shape; states as their text."""
    apps = {}
    for name, app in (details.get("applications") or {}).items():
        deployments = {
            deployment_name: DeploymentState(
                status=_text(deployment.get("status")),
                message=deployment.get("message") or "",
                replica_states=dict(
                    Counter(_text(r.get("state")) for r in deployment.get("replicas") or ())
                ),
            )
            for deployment_name, deployment in (app.get("deployments") or {}).items()
        }
        apps[name] = AppState(_text(app.get("status")), app.get("message") or "", deployments)
    return ServeState(apps)


def _text(state: Any) -> str:
    """A state's text ("RUNNING"): the controller sends Serve's enums or their values."""
    return str(getattr(state, "value", state))
