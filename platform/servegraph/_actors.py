"""The cluster's singleton actors (the rate limiter, the demand board): one detached
actor per name, created by whichever process needs it first, restarted if it dies."""

from __future__ import annotations

from typing import Any

NAMESPACE = "servegraph"


def cluster_actor(cls: type, name: str, **options: Any) -> Any:
    """The handle of the cluster's one actor of `cls` named `name` (created now if no
    process has yet). It asks for no CPU: it answers at once, never computes.
    `options`: more of Ray's actor options (e.g. `resources`, to place it)."""
    import ray

    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            **options,
        )
        .remote()
    )
