"""Does a plan fit? The packing search, the search of every arrival order, and the
cheapest node mix (`check`, `Verdict`). See `servegraph.deploy.capacity`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from servegraph.deploy.capacity.inputs import _EPS, HEAD_RESOURCE, Ask, Node, NodeType

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
SEARCH_BUDGET = 50_000  # states each exact search may visit


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
