"""The local platform `servegraph run` starts: a local Ray cluster, the plan checked
against it, every model server and pipeline deployed and RUNNING, and the pipelines'
start-up hooks (`on_deploy`) run; Serve and Ray shut down when it ends. The command
line (`servegraph.cli`) only parses arguments and prints; `servegraph batch` without an
address runs inside the same platform.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console


def plan_package(package: str, catalog: str) -> Any:
    """The platform's plan: every pipeline of `package` and every server of `catalog`."""
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover
    from servegraph.lang.graph import resolve

    return plan_platform(
        discover(package),
        resolve(catalog),
        catalog_path=catalog,
        packages=[package],
        all_servers=True,
    )


def feasible(plan: Any, cluster: str | None, console: Console, *, quiet: bool = False) -> bool:
    """Print what fits where on `cluster` (None: the running Ray cluster); False when a
    deployment can never be placed or the plan does not fit at its minimum replicas."""
    from pathlib import Path

    from servegraph.deploy.capacity.inputs import asks_of, node_types, running_node_types
    from servegraph.deploy.capacity.report import report
    from servegraph.deploy.capacity.search import check

    with console.status(f"packing the plan onto {cluster or 'this Ray cluster'}"):
        types = node_types(Path(cluster)) if cluster else running_node_types()
        verdict = check(asks_of(plan), types)
    if quiet and verdict.ok:
        at_max = (
            "also at max_replicas"
            if verdict.fits_max
            else f"at max_replicas {len(verdict.unplaced['max'])} replica(s) would wait"
        )
        console.print(f"capacity: every deployment fits at min_replicas ({at_max})")
    else:
        console.print(report(verdict, types), markup=False, highlight=False)
    if not verdict.ok:
        console.print(
            "[red]this plan cannot be placed: Ray Serve would leave those replicas pending "
            "with no explanation. Give the node types more resources or workers, or the "
            "deployments smaller asks (PROFILES, or a node's deployment= overrides).[/red]"
        )
    elif not verdict.fits_max and not quiet:
        console.print(
            "[yellow]fits at min_replicas, not at max_replicas: "
            "autoscaling will stop short[/yellow]"
        )
    return verdict.ok


@contextlib.contextmanager
def local_platform(
    package: str, catalog: str, console: Console, **cluster_options: Any
) -> Iterator[Any]:
    """A local Ray with every pipeline deployed and its start-up hooks run (None when
    the plan cannot be placed); Serve and Ray shut down on exit."""
    from servegraph.deploy.local_ray import local_cluster, wait_until_running

    plan = plan_package(package, catalog)
    quiet_driver_logs()
    with console.status("starting a local Ray cluster"):
        cluster_cm = local_cluster(**cluster_options)
        cluster = cluster_cm.__enter__()
    quiet_driver_logs()  # again: starting Ray resets its loggers
    try:
        console.print(f"Ray's and every replica's logs: {logs_dir()} (replicas: serve/)")
        if not feasible(plan, None, console, quiet=True):
            yield None
            return
        started = time.perf_counter()
        with console.status("deploying model servers and pipelines (the LLM takes ~1 min)"):
            plan.deploy()
            wait_until_running([app.name for app in plan.apps], timeout_s=900)
        console.print(f"all applications RUNNING after {time.perf_counter() - started:.0f}s")
        for module in _modules(package):
            hook = getattr(module, "on_deploy", None)
            if hook is not None:
                hook(cluster.base_url)
        yield cluster
    finally:
        with console.status("shutting down Serve and Ray"):
            cluster_cm.__exit__(None, None, None)


def _modules(package: str) -> list[Any]:
    root = importlib.import_module(package)
    return [
        importlib.import_module(i.name)
        for i in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
    ]


def quiet_driver_logs() -> None:
    """This console is for people: the platform's own progress lines. Ray's and Serve's
    driver-side INFO lines (JSON, one per deployment step) and each HTTP call of the
    start-up hooks go to Ray's log files only; warnings and errors still show."""
    import logging

    for name in ("ray", "ray.serve", "ray.data", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("vllm").setLevel(logging.ERROR)  # import-time notes (Triton on CPU)


def logs_dir() -> str:
    import ray

    node = ray._private.worker._global_node  # the session folder of this cluster
    return str(node.get_logs_dir_path()) if node is not None else "/tmp/ray/session_latest/logs"
