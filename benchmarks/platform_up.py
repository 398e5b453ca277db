"""The whole platform on a fresh local Ray, for benchmarks: every model server and
pipeline deployed and RUNNING, the knowledge base ingested; stopped on exit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serving_everything(**cluster_options: Any) -> Iterator[Any]:
    """Yields the `LocalCluster` (options go to `servegraph.local_ray.local_cluster`)."""
    from ray import serve

    from deployments.catalog import CATALOG
    from pipelines.rag.ingest import on_deploy
    from servegraph.discovery import discover
    from servegraph.local_ray import local_cluster
    from servegraph.planner import plan_platform

    with local_cluster(**cluster_options) as cluster:
        plan_platform(
            discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True
        ).deploy()
        while any(a.status != "RUNNING" for a in serve.status().applications.values()):
            time.sleep(1)
        on_deploy(cluster.base_url)
        yield cluster
