"""Will the plan fit the cluster? A pre-deploy feasibility check.

Ray Serve leaves a replica that cannot be placed pending, with no deadline and no
explanation. `check` answers before deploying: it builds every application of a plan
the way Serve does (`build_app`), takes each deployment's bundles per replica (its
placement group's, or its actor's CPUs, GPUs, memory and custom resources) at
`min_replicas` and at `max_replicas`, and packs them onto the cluster's nodes: the
head node and each worker type up to its `max_workers` (and the cluster's), as the
Ray cluster launcher's `cluster.yaml` describes them. Fractional GPUs are packed per
device, so two 0.6 shares never land on one GPU. The LLM's GPU memory share
(`gpu_memory_utilization`) is compared with the instance's GPU memory where the
instance type is known.

Bundles of one replica go on one node (Serve's placement groups here use PACK). Ray
places replicas one at a time, as they arrive, on a node with room at that moment; it
never moves a placed one. So "fits" has two meanings, and the check answers both:

- **a packing exists** (exact: first-fit decreasing, then a search of every assignment
  when that fails). Without one, Ray leaves replicas pending whatever the order.
- **every arrival order fits**: no order of arrival and no choice of node (or GPU
  device, for a fractional share) by the scheduler can strand a replica. Where some
  can, the plan is *at risk*: whether Ray places it depends on luck, and the report
  says so. Both searches remember the states they have seen; past `SEARCH_BUDGET`
  states the answer is "not proven" rather than a guess.

`tests/integration/test_capacity_agrees_with_ray.py` holds these answers against Ray's
scheduler on simulated clusters.
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
# On-demand prices per hour (USD, AWS us-west-2 list prices, Linux), to name the cheapest
# node mix; a type not listed counts as one unit per node.
PRICE_PER_HOUR = {
    "m6i.xlarge": 0.192,
    "m6i.2xlarge": 0.384,
    "m6i.4xlarge": 0.768,
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g6.xlarge": 0.8048,
    "g6.2xlarge": 0.9776,
}
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource
SEARCH_BUDGET = 50_000  # states each exact search may visit


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


@dataclass
class Verdict:
    """What fits where, at min and max replicas."""

    fits_min: bool
    fits_max: bool
    never: dict[str, str]  # deployment -> why it can never be placed
    placements: dict[str, list[Node]]  # "min"/"max" -> nodes with what they got
    unplaced: dict[str, list[str]]  # "min"/"max" -> replicas left over
    notes: list[str]
    at_risk: dict[str, list[str] | None] = field(default_factory=dict)
    """"min"/"max" -> the deployments some arrival order can leave pending although a
    packing exists (empty: every order fits); None past the search budget (not proven
    either way)."""
    cheapest: dict[str, tuple[dict[str, int], float | None]] = field(default_factory=dict)
    """"min"/"max" -> the cheapest node mix that fits (type -> count) and its price per
    hour (None where a type's price is unknown)."""

    def fits(self, label: str) -> bool:
        return self.fits_min if label == "min" else self.fits_max

    @property
    def ok(self) -> bool:
        return not self.never and self.fits_min


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
    """Every deployment of a plan (`servegraph.planner.PlatformPlan`), built as Serve
    builds it."""
    # Serve's own builder: it resolves the application graph into its deployments with
    # their final options, exactly what `serve deploy` would create.
    from ray.serve._private.build_app import build_app

    from servegraph.graph import resolve

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


def check(asks: Iterable[Ask], types: list[NodeType]) -> Verdict:
    asks = list(asks)
    never: dict[str, str] = {}
    notes: list[str] = []
    for ask in asks:
        if not any(_bundles_fit(ask, t) for t in types):
            never[ask.name] = _why_never(ask, types)
        if ask.gpu_memory_fraction:
            for t in types:
                if t.resources.get("GPU") and t.gpu_memory_gib:
                    notes.append(
                        f"{ask.name}: vLLM reserves {ask.gpu_memory_fraction:.0%} of a "
                        f"{t.gpu_memory_gib:g} GiB GPU on {t.name} "
                        f"({ask.gpu_memory_fraction * t.gpu_memory_gib:.1f} GiB)"
                    )
    placeable = [ask for ask in asks if ask.name not in never]
    placements, unplaced, fits, at_risk = {}, {}, {}, {}
    for label in ("min", "max"):
        nodes = [t.node() for t in types for _ in range(t.max_count)]
        placements[label], unplaced[label] = nodes, _place(placeable, nodes, label)
        search = _Search(placeable, label, [t.node() for t in types for _ in range(t.max_count)])
        exists = True if not unplaced[label] else search.packing_exists()
        fits[label] = bool(exists)
        if exists and unplaced[label]:
            notes.append(
                f"at {label}_replicas a packing exists that first-fit decreasing misses; "
                "the table shows its attempt"
            )
        elif exists is None:
            notes.append(
                f"at {label}_replicas first-fit decreasing finds no packing, and the exact "
                "search ran out of budget: counted as not fitting, not proven"
            )
        at_risk[label] = search.strandable() if fits[label] else []
    verdict = Verdict(
        fits_min=fits["min"],
        fits_max=fits["max"],
        never=never,
        placements=placements,
        unplaced=unplaced,
        notes=sorted(set(notes)),
        at_risk=at_risk,
    )
    if not never:
        for label in ("min", "max"):
            if mix := cheapest_mix(asks, types, label):
                verdict.cheapest[label] = mix
    return verdict


def cheapest_mix(
    asks: list[Ask], types: list[NodeType], label: str, limit: int = 4096
) -> tuple[dict[str, int], float | None] | None:
    """The cheapest counts of each node type (up to its maximum) on which the plan fits
    at `label` ("min" or "max") replicas, with its price per hour; None if none fits."""
    # The head is always there, once; workers from none to their maximum.
    counts = [
        range(1, 2) if HEAD_RESOURCE in t.resources else range(t.max_count + 1) for t in types
    ]
    best: tuple[float, dict[str, int], float | None] | None = None
    for tried, combo in enumerate(itertools.product(*counts)):
        if tried >= limit:
            break
        sized = [replace(t, max_count=n) for t, n in zip(types, combo, strict=True)]
        nodes = [t.node() for t in sized for _ in range(t.max_count)]
        if _place(asks, nodes, label):
            continue
        prices = [PRICE_PER_HOUR.get(t.instance_type or "") for t in sized]
        known = all(p is not None for p in prices)
        cost = sum(
            (p if p is not None else 1.0) * t.max_count for p, t in zip(prices, sized, strict=True)
        )
        if best is None or cost < best[0]:
            mix = {t.name: t.max_count for t in sized if t.max_count}
            best = (cost, mix, round(cost, 3) if known else None)
    return (best[1], best[2]) if best else None


class _OutOfBudget(Exception):
    pass


# The searches' own compact state: a node is (free amount per resource key, free share
# per GPU device sorted), a replica's bundle is (amount per key, GPU share).
_Slot = tuple[tuple[float, ...], tuple[float, ...]]
_Need = tuple[tuple[float, ...], float]


class _Search:
    """Exact answers for one plan at `label` replicas on `nodes` (all empty): does a
    packing exist, and can some arrival order strand a replica? A state is how many
    replicas of each deployment are still to place and what each node still offers
    (nodes that offer the same are interchangeable, so the state sorts them)."""

    def __init__(self, asks: list[Ask], label: str, nodes: list[Node]) -> None:
        asks = sorted(asks, key=_size, reverse=True)  # big ones first: fewer dead ends
        self.counts = tuple(a.min_replicas if label == "min" else a.max_replicas for a in asks)
        self.names = [a.name for a in asks]
        keys = sorted({k for a in asks for b in a.bundles for k in b if k != "GPU"})
        self.needs: list[list[_Need]] = [
            [(tuple(b.get(k, 0.0) for k in keys), b.get("GPU", 0.0)) for b in a.bundles]
            for a in asks
        ]
        # A node type that does not say its memory offers what Ray infers: unbounded here.
        self.nodes: tuple[_Slot, ...] = tuple(
            sorted(
                (
                    tuple(n.free.get(k, math.inf if k == "memory" else 0.0) for k in keys),
                    tuple(sorted(n.gpus)),
                )
                for n in nodes
            )
        )
        self.visited = 0

    def packing_exists(self) -> bool | None:
        self.visited = 0
        memo: dict[tuple, bool] = {}

        def exists(counts: tuple[int, ...], nodes: tuple[_Slot, ...]) -> bool:
            i = next((i for i, n in enumerate(counts) if n), None)
            if i is None:
                return True
            key = (counts, nodes)
            if key not in memo:
                self._count()
                rest = (*counts[:i], counts[i] - 1, *counts[i + 1 :])
                memo[key] = any(exists(rest, after) for after in self._moves(i, nodes))
            return memo[key]

        try:
            return exists(self.counts, self.nodes)
        except _OutOfBudget:
            return None

    def strandable(self) -> list[str] | None:
        """Can Ray, taking replicas in some order and each to some node with room, end
        with a replica no node has room for? It can exactly when the other replicas
        (all but that one, or fewer) have an assignment that leaves every node without
        room for it: any assignment is reachable one replica at a time, as loads only
        grow. So for each deployment, each node in turn takes a fill that blocks it. The
        deployments some order can leave pending (None: past the search budget)."""
        self.visited = 0
        try:
            return [self.names[r] for r, n in enumerate(self.counts) if n and self._can_block(r)]
        except _OutOfBudget:
            return None

    def _can_block(self, r: int) -> bool:
        others = (*self.counts[:r], self.counts[r] - 1, *self.counts[r + 1 :])
        memo: dict[tuple, bool] = {}

        def cover(j: int, counts: tuple[int, ...]) -> bool:
            if j == len(self.nodes):
                return True
            key = (j, counts)
            if key not in memo:
                self._count()
                fills = self._blocking_fills(self.nodes[j], counts, r)
                memo[key] = any(cover(j + 1, rest) for rest in fills)
            return memo[key]

        return cover(0, others)

    def _blocking_fills(self, node: _Slot, counts: tuple[int, ...], r: int) -> set[tuple[int, ...]]:
        """What is left of `counts` after each smallest load of `node` that leaves no
        room for a replica of ask `r` (a load that fits the node, device by device)."""
        left: set[tuple[int, ...]] = set()

        def grow(slot: _Slot, counts: tuple[int, ...], first: int) -> None:
            self._count()
            if not self._hosts(slot, r):
                left.add(counts)
                return
            for a in range(first, len(counts)):
                if counts[a]:
                    rest = (*counts[:a], counts[a] - 1, *counts[a + 1 :])
                    for after in self._hosts(slot, a):
                        grow(after, rest, a)

        grow(node, counts, 0)
        return left

    def _hosts(self, slot: _Slot, i: int) -> list[_Slot]:
        """The states `slot` can be in after hosting one replica of ask `i`."""
        hosts = [slot]
        for need in self.needs[i]:
            hosts = [after for host in hosts for after in _host(host, need)]
        return hosts

    def _moves(self, i: int, nodes: tuple[_Slot, ...]) -> set[tuple[_Slot, ...]]:
        """Every distinct cluster state after one replica of ask `i` is placed."""
        moves = set()
        for at, node in enumerate(nodes):
            if at and node == nodes[at - 1]:
                continue  # the same offer as the previous node: the same outcomes
            for host in self._hosts(node, i):
                moves.add(tuple(sorted((*nodes[:at], host, *nodes[at + 1 :]))))
        return moves

    def _count(self) -> None:
        self.visited += 1
        if self.visited > SEARCH_BUDGET:
            raise _OutOfBudget


def _host(node: _Slot, need: _Need) -> list[_Slot]:
    """The states `node` can be in after hosting a bundle (none: it has no room); a
    fractional GPU share may go to any device with room, the scheduler's choice."""
    free, gpus = node
    amounts, share = need
    if any(f + _EPS < a for f, a in zip(free, amounts, strict=True)):
        return []
    left = tuple(f - a for f, a in zip(free, amounts, strict=True))
    if share <= 0:
        return [(left, gpus)]
    if share >= 1 - _EPS:
        whole = math.ceil(share - _EPS)
        full = [i for i, g in enumerate(gpus) if g >= 1 - _EPS][:whole]
        if len(full) < whole:
            return []
        return [(left, tuple(sorted(0.0 if i in full else g for i, g in enumerate(gpus))))]
    outcomes = []
    for i, g in enumerate(gpus):
        if g + _EPS >= share and (i == 0 or g != gpus[i - 1]):
            rest = tuple(sorted((*gpus[:i], round(g - share, 6), *gpus[i + 1 :])))
            outcomes.append((left, rest))
    return outcomes


def _place(asks: list[Ask], nodes: list[Node], label: str) -> list[str]:
    """Place every replica of `asks` at `label` ("min" or "max") replicas onto `nodes`,
    first-fit decreasing, recording each on its node; the replicas left over."""
    replicas = [
        (ask, i)
        for ask in asks
        for i in range(ask.min_replicas if label == "min" else ask.max_replicas)
    ]
    replicas.sort(key=lambda r: _size(r[0]), reverse=True)
    left = []
    for ask, i in replicas:
        node = next((n for n in nodes if all_fit(n, ask.bundles)), None)
        if node is None:
            left.append(f"{ask.name}#{i + 1}")
            continue
        for bundle in ask.bundles:
            node.take(bundle)
        node.placed.append(f"{ask.name}#{i + 1}")
    return left


def all_fit(node: Node, bundles: tuple[dict[str, float], ...]) -> bool:
    """All of a replica's bundles on one node (PACK), trying them in order."""
    trial = node.copy()
    for bundle in bundles:
        if not trial.fits(bundle):
            return False
        trial.take(bundle)
    return True


def _bundles_fit(ask: Ask, node_type: NodeType) -> bool:
    return node_type.max_count > 0 and all_fit(node_type.node(), ask.bundles)


def _why_never(ask: Ask, types: list[NodeType]) -> str:
    total: dict[str, float] = {}
    for bundle in ask.bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + amount
    largest = {
        key: max((t.resources.get(key, 0.0) for t in types if t.max_count), default=0.0)
        for key in total
    }
    short = [
        f"{key} {need:g} > {largest[key]:g}" for key, need in total.items() if need > largest[key]
    ]
    asked = ", ".join(f"{k} {v:g}" for k, v in total.items())
    return f"one replica asks for {asked}; no node type offers it ({'; '.join(short) or 'split'})"


def _size(ask: Ask) -> tuple[bool, float, float]:
    """Packing order: replicas pinned by a custom resource (few nodes can take them)
    first, then by GPU share, then by CPUs."""
    pinned = any(k not in ("CPU", "GPU", "memory") for b in ask.bundles for k in b)
    gpu = sum(b.get("GPU", 0.0) for b in ask.bundles)
    cpu = sum(b.get("CPU", 0.0) for b in ask.bundles)
    return (pinned, gpu, cpu)


def report(verdict: Verdict, types: list[NodeType]) -> str:
    """The table `servegraph check` prints."""
    lines = [
        "node types: "
        + ", ".join(
            f"{t.name} x{t.max_count} ({', '.join(f'{k} {v:g}' for k, v in t.resources.items())})"
            for t in types
        )
    ]
    for label in ("min", "max"):
        used = [n for n in verdict.placements[label] if n.placed]
        ok = "fits" if verdict.fits(label) else "DOES NOT FIT"
        lines.append(f"\nat {label}_replicas: {ok} on {len(used)} node(s)")
        lines.append(f"  {'node':<12} {'placed':<64} headroom")
        for node in used:
            headroom = ", ".join(
                f"{k} {max(0.0, round(v, 3)):g}" for k, v in node.free.items() if k != "memory"
            )
            if node.gpus:
                headroom += ", GPU " + "/".join(f"{max(0.0, round(g, 3)):g}" for g in node.gpus)
            placed = ", ".join(_count(node.placed))
            lines.append(f"  {node.kind:<12} {placed:<64} {headroom}")
        if verdict.unplaced[label]:
            lines.append("  left pending: " + ", ".join(_count(verdict.unplaced[label])))
        risk = verdict.at_risk.get(label, [])
        if risk is None:
            lines.append("  whether every arrival order fits: not proven (search budget)")
        elif risk:
            lines.append(
                "  AT RISK: replicas arriving in an unlucky order can leave pending "
                + ", ".join(risk)
                + " (Ray never moves a placed replica); give the nodes headroom or pin"
            )
        elif verdict.fits(label):
            lines.append("  every arrival order fits")
    for label, (mix, price) in verdict.cheapest.items():
        nodes = " + ".join(f"{n} x {kind}" for kind, n in mix.items())
        cost = f" (${price:.2f}/h on demand)" if price is not None else ""
        lines.append(f"cheapest node mix at {label}_replicas: {nodes}{cost}")
    for name, why in verdict.never.items():
        lines.append(f"\nNEVER PLACEABLE {name}: {why}")
    for note in verdict.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _count(replicas: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for replica in replicas:
        name = replica.rsplit("#", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} x{n}" if n > 1 else name for name, n in counts.items()]
