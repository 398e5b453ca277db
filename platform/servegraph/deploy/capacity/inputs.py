"""What a plan asks of a cluster, per replica (`Ask`, `asks_of`), and what a cluster
offers (`NodeType` from `cluster.yaml` or the running cluster; `Node`, one node's free
resources); and the cluster file's own checks (`ray_auth_problems`)."""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

# GPU memory per device of common cloud instance types (GiB), for the vLLM share check.
GPU_MEMORY_GIB = {
    "g4dn": 16,  # T4
    "g5": 24,  # A10G
    "g6": 24,  # L4
    "g6e": 48,  # L40S
    "p3": 16,  # V100
    "p4d": 40,  # A100 40 GB
    "p4de": 80,
    "p5": 80,  # H100
}
_EPS = 1e-9


HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


@dataclass(frozen=True)
class Ask:
    """One deployment's needs: its bundles per replica, and how many replicas."""

    app: str
    deployment: str
    bundles: tuple[dict[str, float], ...]
    min_replicas: int
    max_replicas: int
    gpu_memory_fraction: float | None = None  # vLLM's share of a device, if it has one

    @property
    def name(self) -> str:
        return f"{self.app}/{self.deployment}"


@dataclass
class Node:
    """One machine of the cluster and what is still free on it."""

    kind: str
    free: dict[str, float]
    gpus: list[float] = field(default_factory=list)  # free share of each GPU device
    gpu_memory_gib: float | None = None
    placed: list[str] = field(default_factory=list)

    def fits(self, bundle: dict[str, float]) -> bool:
        for key, amount in bundle.items():
            if key == "GPU":
                if amount >= 1 - _EPS:
                    if sum(1 for g in self.gpus if g >= 1 - _EPS) < math.ceil(amount - _EPS):
                        return False
                elif not any(g + _EPS >= amount for g in self.gpus):
                    return False
            elif key == "memory" and key not in self.free:
                continue  # the node type does not say (Ray infers it from the instance)
            elif self.free.get(key, 0.0) + _EPS < amount:
                return False
        return True

    def copy(self) -> Node:
        return Node(self.kind, dict(self.free), list(self.gpus), self.gpu_memory_gib)

    def take(self, bundle: dict[str, float]) -> None:
        for key, amount in bundle.items():
            if key == "GPU":
                if amount >= 1 - _EPS:
                    whole = math.ceil(amount - _EPS)
                    for i, g in enumerate(self.gpus):
                        if whole and g >= 1 - _EPS:
                            self.gpus[i], whole = 0.0, whole - 1
                else:  # best fit: the fullest device that still has room
                    i = min(
                        (i for i, g in enumerate(self.gpus) if g + _EPS >= amount),
                        key=lambda i: self.gpus[i],
                    )
                    self.gpus[i] -= amount
            elif key != "memory" or key in self.free:
                self.free[key] = self.free.get(key, 0.0) - amount


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int
    instance_type: str | None

    @property
    def gpu_memory_gib(self) -> float | None:
        if not self.instance_type:
            return None
        family = self.instance_type.split(".")[0]
        return GPU_MEMORY_GIB.get(family)

    def node(self) -> Node:
        resources = dict(self.resources)
        gpus = int(resources.pop("GPU", 0))
        return Node(self.name, resources, [1.0] * gpus, self.gpu_memory_gib)


def node_types(cluster_yaml: Path) -> list[NodeType]:
    """The head and worker types of a Ray cluster launcher config, each with how many
    of it the cluster may run (the head: one)."""
    config = yaml.safe_load(Path(cluster_yaml).read_text())
    head = config["head_node_type"]
    cluster_max = int(config.get("max_workers", 2**31))
    types = []
    for name, spec in config["available_node_types"].items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head:
            resources[HEAD_RESOURCE] = 1.0
        count = 1 if name == head else min(int(spec.get("max_workers", 0)), cluster_max)
        instance = (spec.get("node_config") or {}).get("InstanceType")
        types.append(NodeType(name, resources, count, instance))
    return types


# The settings a cluster's nodes export that change what its deployments ask for (the
# others name files on those nodes, which a check on another machine must not read).
PLACEMENT_SETTINGS = ("SERVEGRAPH_PROFILE", "SERVEGRAPH_ROUTER_RESOURCES")


def cluster_env(cluster_yaml: Path) -> dict[str, str]:
    """The placement settings the head's start commands export, as the platform's
    builders read them on that cluster (its profile, where routers go)."""
    config = yaml.safe_load(Path(cluster_yaml).read_text())
    env = {}
    for command in config.get("head_start_ray_commands") or []:
        for word in shlex.split(command.replace("&&", " ")):
            name, eq, value = word.partition("=")
            if eq and name in PLACEMENT_SETTINGS:
                env[name] = value
    return env


# Ray's token authentication: every Ray process reads RAY_AUTH_MODE from its environment
# (`ray._private.authentication.authentication_token_setup`); unset, `ray start` on a
# fresh node (no token file) starts without authentication, and then anyone who reaches
# the GCS (6379), the dashboard (8265: job submission runs any code) or Ray Client
# (10001) runs code as the Ray user.
RAY_AUTH_SETTING = "RAY_AUTH_MODE=token"
# Ray's cluster launcher sources ~/.bashrc before every command it runs on a node
# (`ray.autoscaler._private.command_runner._with_interactive`), so a setup command that
# appends this line there sets it for every later command on the node.
RAY_AUTH_PERSISTED = f"export {RAY_AUTH_SETTING}"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def ray_auth_problems(cluster_yaml: Path) -> list[str]:
    """Why Ray on a node this cluster launcher config starts would run without token
    authentication, one line per node type naming the fix; empty when every node type's
    `ray start` runs with RAY_AUTH_MODE=token (set in that command before `ray start`, or
    exported from ~/.bashrc by the node's setup commands)."""
    config = yaml.safe_load(Path(cluster_yaml).read_text())
    shared_setup = list(config.get("setup_commands") or [])
    problems = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == config.get("head_node_type"):
            key = "head_start_ray_commands"
            setup = shared_setup + list(config.get("head_setup_commands") or [])
        else:
            key = "worker_start_ray_commands"
            # As Ray merges them: a node type's own worker_setup_commands replace both.
            setup = list(
                spec["worker_setup_commands"]
                if "worker_setup_commands" in spec
                else shared_setup + list(config.get("worker_setup_commands") or [])
            )
        persisted = any(RAY_AUTH_PERSISTED in c and ".bashrc" in c for c in setup)
        starts = [s for c in config.get(key) or [] for s in _ray_starts(str(c))]
        fix = (
            f"Fix: export {RAY_AUTH_SETTING} in the {key} command that runs `ray start`, "
            "before it, and provision the token every node reads at ~/.ray/auth_token "
            "(cluster.yaml's file_mounts); README, 'Cluster authentication'."
        )
        if not starts and not persisted:
            problems.append(
                f"{name}: no `ray start` in {key} sets {RAY_AUTH_SETTING}, so its Ray "
                f"may start without authentication. {fix}"
            )
        for mode, args in starts:
            mode = mode if mode is not None else ("token" if persisted else None)
            if mode is not None and mode.lower() == "token":  # as Ray reads it
                continue
            how = f"with RAY_AUTH_MODE={mode}" if mode is not None else "without RAY_AUTH_MODE"
            problems.append(
                f"{name}: {key} runs `ray start` {how}: Ray on this node would take "
                "requests with no authentication (anyone reaching the GCS, dashboard or "
                f"Ray Client port runs code as the Ray user). {fix}"
            )
            host = _dashboard_host(args)
            if host is not None and host not in _LOOPBACK:
                problems.append(
                    f"{name}: `ray start --dashboard-host={host}` serves the dashboard "
                    "(its job API runs any code) to the network without token "
                    f"authentication. Set {RAY_AUTH_SETTING}, or keep the dashboard on "
                    "127.0.0.1 and reach it through `ray dashboard cluster.yaml`."
                )
    return problems


def _ray_starts(command: str) -> list[tuple[str | None, list[str]]]:
    """Each `ray start` in a shell command line: the RAY_AUTH_MODE it runs with (exported
    earlier in the line or set as its prefix; None: not set) and its arguments."""
    lexer = shlex.shlex(command.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    simple: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("();|&"):
            simple.append([])  # a control operator ends a simple command
        else:
            simple[-1].append(token)
    exported: str | None = None
    found = []
    for words in simple:
        if words[:1] == ["export"]:
            for word in words[1:]:
                if word.startswith("RAY_AUTH_MODE="):
                    exported = word.partition("=")[2]
            continue
        mode = exported
        while words and (words[0] == "env" or _ASSIGNMENT.match(words[0])):
            if words[0].startswith("RAY_AUTH_MODE="):
                mode = words[0].partition("=")[2]
            words = words[1:]
        if len(words) >= 2 and Path(words[0]).name == "ray" and words[1] == "start":
            found.append((mode, words[2:]))
    return found


def _dashboard_host(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith("--dashboard-host="):
            return arg.partition("=")[2]
        if arg == "--dashboard-host" and i + 1 < len(args):
            return args[i + 1]
    return None


def running_node_types() -> list[NodeType]:
    """The nodes of the Ray cluster this process is connected to, as node types of one."""
    import ray

    kept = ("CPU", "GPU", "memory")
    types = []
    for i, node in enumerate(n for n in ray.nodes() if n["Alive"]):
        resources = {
            k: float(v)
            for k, v in node["Resources"].items()
            if k in (*kept, HEAD_RESOURCE)
            or not (k.startswith(("node:", "accelerator_type")) or "memory" in k)
        }
        types.append(NodeType(f"node{i + 1}", resources, 1, None))
    return types


def asks_of(plan: Any) -> list[Ask]:
    """Every deployment of a plan (`servegraph.deploy.planner.PlatformPlan`), built as Serve
    builds it."""
    # Serve's own builder: it resolves the application graph into its deployments with
    # their final options, exactly what `serve deploy` would create.
    from ray.serve._private.build_app import build_app

    from servegraph.lang.graph import resolve

    asks = []
    with _without_a_ray_connection():
        for app in plan.apps:
            built = build_app(resolve(app.import_path)(app.args), name=app.name)
            for deployment in built.deployments:
                asks.append(_ask(app.name, deployment))
    return asks


@contextmanager
def _without_a_ray_connection() -> Iterator[None]:
    """Building an application normally happens in Serve's controller, inside Ray;
    `ray.serve.llm`'s builder reads the driver's runtime_env there
    (`ray.get_runtime_context()`), which outside Ray would start a local Ray or silently
    attach to a running one. A check must do neither: without a connection, that one
    call answers an empty runtime_env."""
    import ray

    if ray.is_initialized():
        yield
        return
    original = ray.get_runtime_context
    no_context: Any = lambda: SimpleNamespace(runtime_env={})  # noqa: E731
    ray.get_runtime_context = no_context
    try:
        yield
    finally:
        ray.get_runtime_context = original


def _ask(app: str, deployment: Any) -> Ask:
    config = deployment._deployment_config
    autoscaling = config.autoscaling_config
    if autoscaling is not None:
        low, high = autoscaling.min_replicas, autoscaling.max_replicas
    else:
        low = high = int(deployment.num_replicas or 1)
    options = deployment.ray_actor_options or {}
    actor: dict[str, float] = {"CPU": float(options.get("num_cpus", 1))}
    if options.get("num_gpus"):
        actor["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        actor["memory"] = float(options["memory"])
    actor.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    bundles = tuple(
        {k: float(v) for k, v in b.items() if v}
        for b in deployment._replica_config.placement_group_bundles or []
    ) or (actor,)
    fraction = None
    init_kwargs = getattr(deployment, "init_kwargs", None) or {}
    llm_config = init_kwargs.get("llm_config")
    if llm_config is not None:
        fraction = (llm_config.engine_kwargs or {}).get("gpu_memory_utilization")
    return Ask(app, deployment.name, bundles, max(low, 0), max(high, low, 0), fraction)
