"""A local Ray cluster with Serve, started and stopped by us (never attached to).

`ray.init()` with no address silently joins any cluster already running on the
machine; this always starts a fresh one (`address="local"`) on free ports.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from servegraph.auth import AuthSettings, ensure_local_admin_key
from servegraph.tracing import serve_tracing_config, serve_tracing_env

# Ray Serve's request-path settings, read by each Serve process (proxy, replicas) when it
# starts, so set before Ray starts; an operator's own value wins. cluster.yaml exports the
# same. Measured with 64 concurrent single-item callers of the embedder on this 2-core
# machine (issue 10): 38 -> 81 items/s over HTTP, 75 -> 129 through handles.
SERVE_REQUEST_PATH_ENV = {
    # User code on the replica's own event loop instead of a second thread's loop: one
    # cross-thread hand-off less per request each way. Blocking work still leaves the
    # loop: sync methods run in Serve's thread pool, model passes in `asyncio.to_thread`.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # Access-log lines written 1,000 at a time rather than one write per request.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LocalCluster:
    base_url: str
    dashboard_url: str | None
    http_port: int
    metrics_url: str


@contextmanager
def local_cluster(
    *,
    http_port: int | None = None,
    dashboard: bool = True,
    dashboard_port: int | None = None,
    num_cpus: int | None = None,
    metrics_port: int | None = None,
) -> Iterator[LocalCluster]:
    """Start Ray and Serve on this machine; shut both down on exit.

    Args:
        http_port: Serve's HTTP proxy port (a free one by default).
        dashboard: start the Ray dashboard (deployments, replicas, metrics).
        num_cpus: logical CPUs for scheduling. Replicas ask for CPU shares; on a small
            machine we advertise more logical CPUs than cores so every deployment (and an
            autoscaled extra replica) can be placed: they share the cores anyway.
        metrics_port: where Ray serves Prometheus metrics (a free one by default).

    Tracing follows the standard `OTEL_*` variables (see `servegraph.tracing`).
    """
    import ray
    from ray import serve

    http_port = http_port or free_port()
    dashboard_port = dashboard_port or (free_port() if dashboard else None)
    metrics_port = metrics_port or free_port()
    os.environ.update(serve_tracing_env())
    for name, value in SERVE_REQUEST_PATH_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Every replica reads the one key store: name it absolutely, for every process. The
    # local user's admin key exists from here on, for local clients (`client_headers`).
    os.environ.setdefault("SERVEGRAPH_AUTH_KEYS", str(AuthSettings().store_path))
    ensure_local_admin_key()
    context = ray.init(
        address="local",
        num_cpus=num_cpus or max(12, os.cpu_count() or 1),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        namespace="servegraph",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            tracing_config=serve_tracing_config(),
        )
        dashboard_url = context.dashboard_url
        yield LocalCluster(
            base_url=f"http://127.0.0.1:{http_port}",
            dashboard_url=f"http://{dashboard_url}" if dashboard_url else None,
            http_port=http_port,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
