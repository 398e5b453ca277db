"""The support records on Ray Serve: `deployments.records.model.SupportRecords`,
its profile defaults and its application builder.

The database is a file on the disk of the node the replica runs on, so the replica is
pinned to the head node, like the vector index: losing a GPU worker never takes the
agent's look-ups with it. One replica: a look-up is a millisecond read in a thread.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.records import SERVER
from deployments.records.model import SupportRecords
from deployments.serve_options import HEAD_NODE, SHED, ServerAppArgs, server_app
from servegraph.server import accepts_merged_calls, metered

_ON_HEAD = {
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0.1, "resources": HEAD_NODE},
    "max_ongoing_requests": 256,
    "max_queued_requests": 512,
    **SHED,
}
PROFILES = {"cpu": _ON_HEAD, "gpu": _ON_HEAD}


@serve.deployment(name="SupportRecords", num_replicas=1, health_check_period_s=10)
@metered(SERVER.methods)
@accepts_merged_calls(SERVER.methods)
class SupportRecordsDeployment(SupportRecords):
    """`SupportRecords`, with a health check Serve runs every 10 s."""

    def check_health(self) -> None:
        self._query("SELECT id FROM orders WHERE id = ?", "00000")  # raises if unreadable


def app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    """The support records' Serve application (Serve calls it with its config entry's args)."""
    return server_app("records", SupportRecordsDeployment, PROFILES, args)
