"""A local Ray cluster with Serve, started and stopped by us (never attached to).

`ray.init()` with no address silently joins any cluster already running on the
machine; this always starts a fresh one (`address="local"`) on free ports.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servegraph.security.client import ensure_local_admin_key
from servegraph.security.keys import AuthSettings
from servegraph.settings import AppSettings
from servegraph.telemetry.tracing import serve_tracing_config, serve_tracing_env

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
    # Serve's log lines (an access line per request in the proxy and each replica, a
    # warning per refusal) written to Serve's log files only, not a second time, unbuffered,
    # to the process's stderr (which Ray writes to the worker's .err file). Serve's proxy
    # refusing 1,000 requests at once: 0.81 -> 0.71 CPU-s (four bursts each, issue 23).
    "RAY_SERVE_LOG_TO_STDERR": "0",
    # A request whose replica dies before answering gets a 502 naming what happened,
    # not the bare 500 Serve's proxy leaves to uvicorn (`servegraph.serving.proxy_answers`).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": (
        "servegraph.serving.proxy_answers:proxy_middlewares"
    ),
}

# What Ray spends at rest, when no request comes: on a 2-core machine every other
# process's CPU comes out of the LLM engine's and the encoders' forward passes. The
# whole platform at rest (`make run`, 21 processes) used 30 % of a core, measured by
# process over 40 s (issue 22); with these 23-25 % (the Serve controller 7 -> 4 %,
# Ray's log monitor 2 -> 1 %, each replica about 0.9 -> 0.8 %). The rest is Ray's own
# per-process cost (each worker's core worker threads), which no setting reaches.
RAY_AT_REST_ENV = {
    # Serve's metrics (for Prometheus, scraped every 10 s or more) handed to Ray's
    # metrics API once a second rather than ten times, in every replica and router.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # The controller's loop (deployment states, health checks, autoscaling decisions)
    # four times a second rather than ten: a decision may come up to 0.15 s later (0.075 s
    # on average), against replica starts of tens of seconds.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25",
    # Ray's log monitor looks for new log files every 5 s rather than on each of its
    # ten passes a second (it still reads new lines ten times a second).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
}

# On-premises and air-gapped: Ray's usage statistics, which Ray reports to its makers'
# server (usage-stats.ray.io) unless told not to, are off. `ray.init`'s own local
# cluster already turns them off (release wheels, whatever the operator set); this is
# for the clusters started otherwise: `ray start` (cluster.yaml) and the simulated
# cluster's nodes. It also spares an LLM replica's start `ray.serve.llm`'s usage report,
# which waits on an actor of its own on the head node (`deployments.llm.engine.LLMServer`).
RAY_PRIVATE_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}

RAY_ENV = {**SERVE_REQUEST_PATH_ENV, **RAY_AT_REST_ENV, **RAY_PRIVATE_ENV}
"""What local_ray sets (unless the operator did) before Ray starts, and cluster.yaml's
nodes export."""


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
    gcs_address: str = ""  # Ray's address, on 127.0.0.1: `servegraph batch --address`


@contextmanager
def local_cluster(
    *,
    http_port: int | None = None,
    dashboard: bool = True,
    dashboard_port: int | None = None,
    num_cpus: int | None = None,
    metrics_port: int | None = None,
    ingress: str | None = None,
) -> Iterator[LocalCluster]:
    """Start Ray and Serve on this machine; shut both down on exit.

    Args:
        http_port: Serve's HTTP proxy port (a free one by default).
        dashboard: start the Ray dashboard (deployments, replicas, metrics).
        num_cpus: logical CPUs for scheduling. Replicas ask for CPU shares; on a small
            machine we advertise more logical CPUs than cores so every deployment (and an
            autoscaled extra replica) can be placed: they share the cores anyway.
        metrics_port: where Ray serves Prometheus metrics (a free one by default).
        ingress: what answers HTTP, "proxy" (Serve's proxy actor) or "haproxy" (Serve's
            HAProxy mode); default `SERVEGRAPH_INGRESS` (`AppSettings.ingress`).

    Tracing follows the standard `OTEL_*` variables (see `servegraph.telemetry.tracing`).
    """
    import ray
    from ray import serve

    http_port = http_port or free_port()
    dashboard_port = dashboard_port or (free_port() if dashboard else None)
    metrics_port = metrics_port or free_port()
    _prepare_environment()
    with ExitStack() as stack:
        stack.enter_context(_ingress_environment(ingress or AppSettings().ingress))
        with _loopback_only():
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
        stack.callback(ray.shutdown)
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            tracing_config=serve_tracing_config(),
        )
        stack.callback(serve.shutdown)  # before Ray's: callbacks run last in, first out
        dashboard_url = context.dashboard_url
        yield LocalCluster(
            base_url=f"http://127.0.0.1:{http_port}",
            dashboard_url=f"http://{dashboard_url}" if dashboard_url else None,
            http_port=http_port,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            gcs_address=ray.get_runtime_context().gcs_address,
        )


# Ray's switch for its one-machine mode (the only mode it has on Windows and macOS).
_ONE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts: its one-machine mode, in which every server Ray runs (the GCS,
    the raylet and its workers, the dashboard agent, the Prometheus exporter on
    `metrics_port` with per-key request counts and costs, the autoscaler's and the
    dashboard's metrics) listens on 127.0.0.1 instead of on every interface.

    A local platform is one machine: nothing outside it needs Ray, and Ray offers no
    host setting for those servers; it binds them to the node's IP, which is 127.0.0.1 in
    this mode only (`ray.init(_node_ip_address="127.0.0.1")` is turned back into the
    machine's outward address). The mode is an environment variable that each process
    reads when it imports Ray: set for the processes `ray.init` starts (the raylet starts
    every later worker with its own environment), and in this process's copy, as this
    process may have imported Ray already. Both are as before on exit, so that a cluster
    started later from this process (`ray start`, `serve deploy`) is not affected.
    Another process attaches in the same mode (`attach`)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environment({_ONE_MACHINE_ENV: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def attach(address: str) -> None:
    """`ray.init` onto a running cluster at `address` (its GCS, host:port), from a
    process that did not start it (`servegraph batch --address`).

    A local platform's GCS listens on 127.0.0.1 only (`_loopback_only`), and a process
    outside Ray's one-machine mode turns a loopback address into the machine's outward
    one and waits for ever for a GCS there. So an address on the loopback is attached
    in that mode, which also reaches a cluster whose nodes listen on every interface (a
    head node attached from itself): Ray finds the node to join by the raylets running
    on this machine, not by its address. `auto` (or RAY_ADDRESS) is looked up first,
    as `ray.init` would.

    A local platform's Ray takes only callers with its token: `ray.init` turns Ray's token
    authentication on for a new local cluster (Ray 2.60), with the token in
    ~/.ray/auth_token, but a process that joins one sends no token unless RAY_AUTH_MODE
    says so, and is refused. So for a Ray on this machine (an address on the loopback,
    or `auto`), where the operator set no RAY_AUTH_MODE and a token is at hand (that
    file, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), the token is sent, as `ray.init`
    does on the cluster it starts. Never to another machine's address: Ray's gRPC is not
    encrypted, and that token also opens this machine's replicas (Ray switches token
    mode on by itself only for `auto` too); the operator sets RAY_AUTH_MODE for that."""
    import ipaddress

    import ray
    from ray._private.services import get_ray_address_from_environment

    this_machine = address == "auto"
    address = get_ray_address_from_environment(address, None) or address
    host = address.rpartition(":")[0].strip("[]") or address
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or this_machine:
        _token_auth_where_a_token_is()
    with _loopback_only() if loopback else nullcontext():
        ray.init(address=address, namespace="servegraph", log_to_driver=False)


def _token_auth_where_a_token_is() -> None:
    """RAY_AUTH_MODE=token for this process (and the Ray processes it starts), unless the
    operator chose a mode, where a Ray token is at hand; Ray's own switch, which a new
    local `ray.init` flips the same way."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    # As Ray's own `authentication_token_setup` imports it (the stub lacks it).
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()


_SOCKET_PATH_MAX = 97  # HAProxy's limit on a Unix socket's path


# HAProxy's own errors answered as the platform's 502 (`servegraph.serving.haproxy_answers`)
HAPROXY_ANSWERS_HOOK = "servegraph.serving.haproxy_answers:use_platform_answers"


@contextmanager
def _ingress_environment(ingress: str) -> Iterator[dict[str, str]]:
    """While the cluster runs, the environment Serve reads (as Ray starts) to put
    `ingress` in front of the apps; yields what it set. On exit every variable it
    touched is as it was before, and HAProxy's private directory is removed.

    Serve's HAProxy mode keeps its files under /tmp/haproxy-serve by default, readable by
    every local user, with an admin socket of mode 666: any local user could re-point a
    backend at its own port and read the callers' API keys. Here they live in a
    directory only this user can enter. Its fixed ports (HAProxy's stats 8404 and
    metrics 9101, which it binds on every interface, and the fallback proxy's 8500 and
    9500) become free ones, so that two local clusters can run at once. For "proxy",
    a `RAY_SERVE_ENABLE_HA_PROXY` inherited from the environment is set aside, so that
    it cannot start HAProxy with Serve's defaults.

    An ingress replica that stops drains for 5 s rather than Serve's 30: that period is
    for an external load balancer (an ALB) to deregister it, where here the balancer is
    Serve's own HAProxy, re-configured by Serve's controller as the replica leaves (and
    a request refused by a stopped replica is re-dispatched by HAProxy, as nothing was
    sent). An operator's own value wins. So does an operator's own controller hook,
    which otherwise makes HAProxy's own errors the platform's 502s
    (`servegraph.serving.haproxy_answers`)."""
    if ingress not in ("proxy", "haproxy"):
        raise ValueError(f"unknown ingress {ingress!r}: 'proxy' or 'haproxy'")
    env: dict[str, str | None] = {"RAY_SERVE_ENABLE_HA_PROXY": None}  # None: unset
    with ExitStack() as stack:
        if ingress == "haproxy":
            # Mode 0700. Short: HAProxy's Unix socket paths are at most 97 characters,
            # and Serve puts them under a 56-character node id here.
            folder = tempfile.TemporaryDirectory(
                prefix="sgh-",
                dir="/tmp" if Path("/tmp").is_dir() else None,
                ignore_cleanup_errors=True,
            )
            private = Path(stack.enter_context(folder))
            if len(str(private)) + len("/") + 56 + len("/metrics.sock") > _SOCKET_PATH_MAX:
                raise RuntimeError(f"HAProxy's socket paths under {private} would be too long")
            env = {
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(private / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(private / "admin.sock"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(private / "metrics.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(private),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(private / "server-state"),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            }
            if "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in os.environ:
                env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
            if "RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH" not in os.environ:
                env["RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH"] = HAPROXY_ANSWERS_HOOK
        with environment(env):  # restored before the folder goes, as the stack unwinds
            yield {name: value for name, value in env.items() if value is not None}


@contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """`values` in this process's environment (None unsets a variable), which a cluster
    started meanwhile inherits; afterwards every variable named is as it was."""
    before = {name: os.environ.get(name) for name in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(before)


def wait_until_running(apps: list[str], timeout_s: float = 600) -> None:
    """Wait, bounded, until every Serve application in `apps` is RUNNING; RuntimeError
    naming any that failed to deploy, TimeoutError naming their states at the end."""
    import time

    from servegraph._serve_status import serve_state

    deadline = time.monotonic() + timeout_s
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = serve_state().applications
        states = {name: status[name].status if name in status else None for name in apps}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = {n: status[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        time.sleep(1)
    raise TimeoutError(f"applications not running after {timeout_s}s: {states}")


def _set_environment(values: dict[str, str | None]) -> None:
    """Set each variable to its value; None unsets it (as `os.environ.get` read it)."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _prepare_environment() -> None:
    """What every process of a cluster we start inherits: set before Ray starts."""
    os.environ.update(serve_tracing_env())
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Every replica reads the one key store: name it absolutely, for every process. The
    # local user's admin key exists from here on, for local clients (`client_headers`).
    os.environ.setdefault("SERVEGRAPH_AUTH_KEYS", str(AuthSettings().store_path))
    os.environ.setdefault("SERVEGRAPH_RUNS", str(AppSettings().runs_path))  # the same, for runs
    os.environ.setdefault("SERVEGRAPH_TRAFFIC", str(AppSettings().traffic_path))  # and traffic
    ensure_local_admin_key()


@dataclass(frozen=True)
class SimulatedNode:
    """One node of a simulated cluster: its type's name (also a custom resource of 1 on
    the node, so a test can ask where a replica runs) and its logical resources."""

    kind: str
    resources: dict[str, float]


@dataclass
class SimulatedCluster:
    base_url: str
    http_port: int
    cluster: Any  # ray.cluster_utils.Cluster
    nodes: dict[str, list[Any]]  # node type -> its raylets (ray._private.node.Node)
    token_file: Path  # Ray's auth token of this cluster (RAY_AUTH_TOKEN_PATH)
    dashboard_url: str | None = None

    def auth_headers(self) -> dict[str, str]:
        """What a caller of the cluster's dashboard (its job API, its state API) sends."""
        return {"authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def node_kind(self, node_id: str) -> str:
        """The type of the node with Ray node id `node_id`."""
        for kind, raylets in self.nodes.items():
            if any(raylet.node_id == node_id for raylet in raylets):
                return kind
        raise KeyError(node_id)

    def add(self, node: SimulatedNode, env: dict[str, str] | None = None) -> Any:
        """Start one more node; `env` is its own environment on top of this process's
        (every process on the node inherits it), e.g. a different model folder."""
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            raylet = self.cluster.add_node(**_raylet_args(node))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.cluster.wait_for_nodes()
        self.nodes.setdefault(node.kind, []).append(raylet)
        return raylet

    def remove(self, raylet: Any) -> None:
        """Take a worker away, as a cloud would (its raylet and every process on it)."""
        self.cluster.remove_node(raylet, allow_graceful=False)
        for raylets in self.nodes.values():
            if raylet in raylets:
                raylets.remove(raylet)


@contextmanager
def simulated_cluster(
    head: SimulatedNode,
    workers: list[SimulatedNode],
    *,
    http_port: int | None = None,
    dashboard: bool = False,
) -> Iterator[SimulatedCluster]:
    """Several Ray nodes on this machine (`ray.cluster_utils.Cluster`, one raylet each),
    with the resources the node types declare: logical GPUs make placement real where
    no GPU exists (a replica asking for 0.1 GPU lands on a node that declares one).
    Serve's HTTP proxy runs on the head only (all nodes share this machine's ports).
    Ray runs with token authentication, as `cluster.yaml`'s nodes do; `dashboard` starts
    the full dashboard (job API included) on 127.0.0.1."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    http_port = http_port or free_port()
    _prepare_environment()
    dashboard_args = (
        {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}
        if dashboard
        else {"include_dashboard": False}
    )
    with _ray_token_auth() as token_file:
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args=_raylet_args(head, **dashboard_args),
        )
        with _shut_down(cluster):
            nodes: dict[str, list[Any]] = {head.kind: [cluster.head_node]}
            for worker in workers:
                nodes.setdefault(worker.kind, []).append(cluster.add_node(**_raylet_args(worker)))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace="servegraph", log_to_driver=False)
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": "127.0.0.1", "port": http_port},
                tracing_config=serve_tracing_config(),
            )
            yield SimulatedCluster(
                f"http://127.0.0.1:{http_port}",
                http_port,
                cluster,
                nodes,
                token_file,
                f"http://{cluster.webui_url}" if dashboard and cluster.webui_url else None,
            )


@contextmanager
def _shut_down(cluster: Any) -> Iterator[None]:
    """Serve, this driver's connection, then every node of `cluster`, whatever happens."""
    import ray
    from ray import serve

    try:
        yield
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


_RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@contextmanager
def _ray_token_auth() -> Iterator[Path]:
    """Ray token authentication for a cluster this process starts node by node.

    `ray.init()` on a new local cluster and `ray start --head` turn token auth on
    themselves (Ray 2.60); `ray.cluster_utils.Cluster` builds its nodes directly and
    never does, so its Ray would take requests from anyone. Here: a fresh token in a
    file only its owner reads, and RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH for this
    process and every Ray process it starts (they inherit its environment). On exit the
    environment is restored first, then the file goes (a Ray process whose
    RAY_AUTH_TOKEN_PATH names a missing file aborts)."""
    # As Ray's own `authentication_token_setup` imports them (the stub lacks them).
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    def reload() -> None:
        # This process's cached Ray config and token, re-read from the environment (in
        # this order, as Ray's own tests reset them).
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    saved = {name: os.environ.get(name) for name in _RAY_AUTH_ENV}
    with tempfile.TemporaryDirectory(prefix="servegraph-ray-auth-") as folder:  # mode 0700
        token_file = Path(folder) / "auth_token"
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_hex(32))  # as `ray get-auth-token --generate`
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        reload()
        try:
            yield token_file
        finally:
            _set_environment(saved)
            reload()


def _raylet_args(node: SimulatedNode, **extra: Any) -> dict[str, Any]:
    resources = dict(node.resources)
    return {
        "num_cpus": int(resources.pop("CPU", 1)),
        "num_gpus": int(resources.pop("GPU", 0)),
        "resources": {**resources, node.kind: 1},
        "object_store_memory": 256 * 1024**2,  # each raylet's own store, on one machine
        **extra,
    }
