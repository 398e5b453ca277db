"""The whole platform on a fresh local Ray, for benchmarks: every model server and
pipeline deployed and RUNNING, the knowledge base ingested; stopped on exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serving_everything(**cluster_options: Any) -> Iterator[Any]:
    """Yields the `LocalCluster` (options go to `servegraph.deploy.local_ray.local_cluster`)."""

    from deployments.catalog import CATALOG
    from pipelines.rag.ingest import on_deploy
    from servegraph.deploy.local_ray import local_cluster, wait_until_running
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover

    with local_cluster(**cluster_options) as cluster:
        plan = plan_platform(
            discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True
        )
        plan.deploy()
        wait_until_running([app.name for app in plan.apps], timeout_s=900)
        on_deploy(cluster.base_url)
        yield cluster
