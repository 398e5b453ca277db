"""The vector index on Ray Serve: `deployments.vector_index.model.VectorIndex`, its
profile defaults and its application builder.

Held to ONE replica by configuration, on purpose: the FAISS structure lives in the
replica's memory, so a second replica would answer searches from its own copy and miss
writes the first acknowledged until it reopened the store. One replica makes "a search
after an acknowledged add sees it" true by construction; flat search on 100k x 384
vectors takes ~6 ms here, so one replica is not the bottleneck of any pipeline.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.serve_options import HEAD_NODE, SHED, ServerAppArgs, server_app
from deployments.vector_index import SERVER
from deployments.vector_index.model import VectorIndex
from servegraph.server import accepts_merged_calls, metered

# The index's SQLite file is on the local disk of the node its replica runs on, so the
# replica is pinned to the head node (HEAD_NODE). The other choice, by configuration:
# SERVEGRAPH_INDEX_PATH on storage every node mounts, and this pin overridden away (the
# builder's `overrides`).

# One replica on both profiles: a death is a restart that rebuilds FAISS from SQLite,
# and the retried calls wait for it.
_ONE_REPLICA = {
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0.5, "resources": HEAD_NODE},
    "max_ongoing_requests": 256,
    "max_queued_requests": 512,
    **SHED,
}
PROFILES = {"cpu": _ONE_REPLICA, "gpu": _ONE_REPLICA}


@serve.deployment(name="VectorIndex", num_replicas=1, health_check_period_s=10)
@metered(SERVER.methods)
@accepts_merged_calls(SERVER.methods)
class VectorIndexDeployment(VectorIndex):
    """`VectorIndex`, with a health check Serve runs every 10 s."""

    def check_health(self) -> None:
        self._store.count()  # raises if the database is gone or locked


def app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    """The vector index's Serve application (Serve calls it with its config entry's args)."""
    return server_app("vector_index", VectorIndexDeployment, PROFILES, args, check=_one_replica)


def _one_replica(options: dict[str, Any]) -> None:
    if options.get("num_replicas", 1) != 1 or "autoscaling_config" in options:
        raise ValueError("vector_index runs exactly one replica (see its server.py)")
