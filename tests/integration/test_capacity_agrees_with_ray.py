"""`servegraph check` against Ray's own scheduler (issue 16): varied plans on varied
simulated clusters, and no disagreement.

Each cluster shape is started for real (`ray.cluster_utils.Cluster`: one raylet per node,
with its logical CPUs, GPUs and a custom role resource). Each plan's replicas then arrive
one at a time, in a random order, each as a placement group of its bundles: what Ray
reserves for a Serve replica (a deployment's `placement_group_bundles`, or its actor's
resources, which are the same amounts). Ray's answer is read from the placement groups'
scheduling state (placed, no resources now, infeasible ever); the test waits for those
states, never for a time.

The checker's claims, and what each must agree with:

| checker | Ray, whatever the order |
| --- | --- |
| never placeable | the replica is infeasible |
| no packing exists | some replica waits |
| every arrival order fits | every replica is placed |
| at risk (a packing exists, some order strands a replica) | either; counted |
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from servegraph.deploy.capacity.inputs import Ask, NodeType
from servegraph.deploy.capacity.search import check

pytestmark = pytest.mark.own_cluster

SHAPES = 6
PLANS_PER_SHAPE = 25
ROLE = "role_head"  # a custom resource, as cluster.yaml's head has node:__internal_head__
DECIDED = {"FINISHED", "NO_RESOURCES", "INFEASIBLE"}  # a group's states once Ray has decided


@dataclass
class Outcome:
    checked: int = 0
    at_risk_placed: int = 0
    at_risk_waited: int = 0
    disagreements: list[str] | None = None


def shapes(rng: random.Random) -> Iterator[list[dict[str, float]]]:
    for _ in range(SHAPES):
        nodes = [{"CPU": float(rng.choice([2, 4, 8, 8])), ROLE: 1.0}]  # the head: no GPU
        for _ in range(rng.randint(1, 2)):
            node = {"CPU": float(rng.choice([2, 4, 8, 8]))}
            if gpus := rng.choice([0, 1, 1, 2]):
                node["GPU"] = float(gpus)
            nodes.append(node)
        yield nodes


def plan(rng: random.Random) -> list[Ask]:
    asks = []
    for d in range(rng.randint(1, 4)):
        bundle = {"CPU": rng.choice([0.5, 1.0, 2.0])}
        if share := rng.choice([0, 0, 0.1, 0.25, 0.5, 0.6, 1.0]):
            bundle["GPU"] = share
        elif rng.random() < 0.2:
            bundle[ROLE] = 0.001  # pinned to the head, as the vector index is
        if rng.random() < 0.05:
            bundle["CPU"] = 16.0  # larger than any node: never placeable
        n = rng.randint(1, 3)
        asks.append(Ask("app", f"d{d}", (bundle,), n, n))
    return asks


def checker_says(asks: list[Ask], nodes: list[dict[str, float]]) -> str:
    types = [NodeType(f"n{i}", dict(node), 1, None) for i, node in enumerate(nodes)]
    verdict = check(asks, types)
    if verdict.never:
        return "never"
    if not verdict.fits_min:
        return "no packing"
    risk = verdict.at_risk["min"]
    assert risk is not None, "small plans are always decided within the search budget"
    return "at risk" if risk else "fits"


def ray_says(asks: list[Ask], rng: random.Random, late: list[str]) -> str:
    from ray.util.placement_group import placement_group, remove_placement_group

    replicas = [ask.bundles for ask in asks for _ in range(ask.min_replicas)]
    rng.shuffle(replicas)
    groups, first = [], []
    for bundles in replicas:
        group = placement_group([dict(b) for b in bundles], strategy="PACK")
        groups.append(group)
        _wait(lambda g=group: _state(g) in DECIDED, "a decision")
        first.append(_state(group))
    # A group Ray first left waiting (NO_RESOURCES) may still be placed once its view of
    # the nodes catches up (resources freed by the last plan's groups, or reserved by this
    # one's): Ray's answer is final when every group is placed, or infeasible, or waits
    # while no node has room for it in Ray's own view of what each node has free.
    _wait(lambda: _decided(groups), "every group placed, or waiting for want of room")
    states = [_state(group) for group in groups]
    late.extend(
        a for a, b in zip(first, states, strict=True) if (a, b) == ("NO_RESOURCES", "FINISHED")
    )
    for group in groups:
        remove_placement_group(group)
    _wait(lambda: _all_released(groups), "the groups removed and their resources freed")
    if "INFEASIBLE" in states:
        return "never"
    return "placed" if all(s == "FINISHED" for s in states) else "waits"


def _state(group) -> str:
    """A placement group's scheduling state (FINISHED, NO_RESOURCES, INFEASIBLE, or
    not decided yet)."""
    from ray.util.placement_group import placement_group_table

    return str(placement_group_table(group)["stats"]["scheduling_state"])


def _decided(groups: list) -> bool:
    from ray._private.state import available_resources_per_node, total_resources_per_node

    states = [_state(g) for g in groups]
    if not set(states) <= DECIDED:
        return False  # one is being placed
    waiting = [g for g, state in zip(groups, states, strict=True) if state == "NO_RESOURCES"]
    free, total = available_resources_per_node(), total_resources_per_node()
    return not any(
        _surely_fits(bundle, free[node], total.get(node, {}))
        for group in waiting
        for bundle in group.bundle_specs
        for node in free
    )


def _surely_fits(bundle: dict[str, float], free: dict[str, float], total: dict[str, float]) -> bool:
    """Whether a node has room for `bundle` whatever is where, from Ray's per-node sums.
    CPUs and custom resources divide freely; a GPU share must fit on one of the node's
    GPUs, which the sum hides: a share under one GPU surely fits only where the free sum,
    spread evenly, leaves that much on each GPU, and whole GPUs only where all are free."""
    for name, amount in bundle.items():
        have = free.get(name, 0.0)
        if name != "GPU":
            if have < amount:
                return False
            continue
        gpus = total.get("GPU", 0.0)
        if not gpus or (have / gpus < amount if amount < 1 else have < gpus or gpus < amount):
            return False
    return True


def _all_released(groups: list) -> bool:
    """As Ray's own tests wait after removing groups: each one REMOVED, no `_group_`
    resource left, and every resource free again."""
    import ray
    from ray.util.placement_group import placement_group_table

    if any(placement_group_table(g)["state"] != "REMOVED" for g in groups):
        return False
    available = ray.available_resources()
    return not any("_group_" in name for name in available) and available == ray.cluster_resources()


def _wait(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


AGREES = {
    "never": {"never"},
    "no packing": {"waits"},
    "fits": {"placed"},
    "at risk": {"placed", "waits"},
}


def test_the_checker_agrees_with_rays_scheduler_on_every_generated_plan() -> None:
    import ray
    from ray.cluster_utils import Cluster

    rng = random.Random(16)
    outcome = Outcome(disagreements=[])
    seen: dict[str, int] = {}
    late: list[str] = []  # first decisions Ray changed later (a group placed after waiting)
    for nodes in shapes(rng):
        head, *workers = nodes
        head_args = {**_args(head), "include_dashboard": False}
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=head_args)
        try:
            for worker in workers:
                cluster.add_node(**_args(worker))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            for _ in range(PLANS_PER_SHAPE):
                asks = plan(rng)
                mine, theirs = checker_says(asks, nodes), ray_says(asks, rng, late)
                outcome.checked += 1
                seen[mine] = seen.get(mine, 0) + 1
                if mine == "at risk":
                    if theirs == "placed":
                        outcome.at_risk_placed += 1
                    else:
                        outcome.at_risk_waited += 1
                if theirs not in AGREES[mine]:
                    outcome.disagreements.append(
                        f"{nodes}: {[(a.bundles[0], a.min_replicas) for a in asks]}: "
                        f"checker {mine}, Ray {theirs}"
                    )
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(
        f"\ncapacity check vs Ray: {outcome.checked} plans on {SHAPES} cluster shapes, "
        f"verdicts {seen}, at risk: Ray placed {outcome.at_risk_placed}, "
        f"left waiting {outcome.at_risk_waited}; disagreements {len(outcome.disagreements)}; "
        f"groups placed after first waiting {len(late)}"
    )
    assert not outcome.disagreements, "\n".join(outcome.disagreements)
    assert all(seen.get(kind) for kind in AGREES), seen  # every verdict was exercised


def _args(node: dict[str, float]) -> dict:
    resources = {k: v for k, v in node.items() if k not in ("CPU", "GPU")}
    return {
        "num_cpus": int(node["CPU"]),
        "num_gpus": int(node.get("GPU", 0)),
        "resources": resources,
        "object_store_memory": 80 * 1024**2,
    }
