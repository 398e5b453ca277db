"""The pre-deploy feasibility check (`servegraph.deploy.capacity`, `servegraph check`): the
platform's real GPU plan against cluster.yaml, GPU fragmentation, what can never be
placed, and the command's exit code. No Ray: plans are built as Serve builds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from servegraph.cli import main
from servegraph.deploy.capacity.inputs import HEAD_RESOURCE, Ask, NodeType, node_types
from servegraph.deploy.capacity.report import report
from servegraph.deploy.capacity.search import check

ROOT = Path(__file__).resolve().parents[2]


def gpu_node(count: int = 1, gpus: int = 1) -> NodeType:
    return NodeType("gpu", {"CPU": 8.0, "GPU": float(gpus)}, count, "g5.2xlarge")


def test_fractional_gpus_are_packed_per_device_not_summed() -> None:
    # 0.6 + 0.6 + 0.5 = 1.7 of 2 GPUs, but no device has room for the 0.5 after two 0.6.
    asks = [
        Ask("llm", "big", ({"GPU": 0.6, "CPU": 1.0},), 2, 2),
        Ask("x", "half", ({"GPU": 0.5, "CPU": 1.0},), 1, 1),
    ]
    verdict = check(asks, [gpu_node(gpus=2)])
    assert not verdict.fits_min and verdict.unplaced["min"] == ["x/half#1"]
    assert check(asks, [gpu_node(gpus=3)]).fits_min  # a third device makes room


def test_a_packing_first_fit_decreasing_misses_is_found_by_the_exact_search() -> None:
    # 3, 3, 2, 2, 2 CPUs on nodes of 7 and 5: first fit decreasing puts 3 + 3 on the
    # big one, 2 + 2 on the small one, and the last 2 nowhere; 3 + 2 + 2 | 3 + 2 fits.
    asks = [
        Ask("a", "three", ({"CPU": 3.0},), 2, 2),
        Ask("a", "two", ({"CPU": 2.0},), 3, 3),
    ]
    types = [NodeType("big", {"CPU": 7.0}, 1, None), NodeType("small", {"CPU": 5.0}, 1, None)]
    verdict = check(asks, types)
    assert verdict.unplaced["min"] == ["a/two#3"] and verdict.fits_min and verdict.ok


def test_an_order_that_strands_a_pinned_replica_is_reported_at_risk() -> None:
    # The index needs the head; two 2-CPU replicas arriving first can take the head's CPUs.
    asks = [
        Ask("vector_index", "VectorIndex", ({"CPU": 1.0, HEAD_RESOURCE: 0.001},), 1, 1),
        Ask("embedder", "Embedder", ({"CPU": 2.0},), 2, 2),
    ]
    head = NodeType("head", {"CPU": 4.0, HEAD_RESOURCE: 1.0}, 1, None)
    worker = NodeType("worker", {"CPU": 4.0}, 1, None)
    verdict = check(asks, [head, worker])
    assert verdict.ok and verdict.at_risk["min"] == ["vector_index/VectorIndex"]
    assert "AT RISK" in report(verdict, [head, worker])
    roomy = NodeType("head", {"CPU": 5.0, HEAD_RESOURCE: 1.0}, 1, None)
    assert check(asks, [roomy, worker]).at_risk["min"] == []  # one CPU of headroom


def test_fractional_shares_can_strand_a_whole_gpu_replica() -> None:
    # Two 0.5 shares may land on two different devices: then no whole GPU is left.
    asks = [
        Ask("x", "half", ({"GPU": 0.5, "CPU": 1.0},), 2, 2),
        Ask("llm", "whole", ({"GPU": 1.0, "CPU": 1.0},), 1, 1),
    ]
    verdict = check(asks, [gpu_node(gpus=2)])
    assert verdict.fits_min and verdict.at_risk["min"] == ["llm/whole"]


def test_an_ask_no_node_type_offers_is_never_placeable_and_says_why() -> None:
    asks = [Ask("llm", "huge", ({"GPU": 2.0, "CPU": 4.0},), 1, 1)]
    verdict = check(asks, [gpu_node(count=4)])
    assert not verdict.ok and "GPU 2 > 1" in verdict.never["llm/huge"]
    assert "NEVER PLACEABLE llm/huge" in report(verdict, [gpu_node(count=4)])


def test_the_cheapest_mix_prefers_the_cheaper_type_that_fits() -> None:
    asks = [Ask("x", "cpu-only", ({"CPU": 6.0},), 2, 2)]
    types = [
        NodeType("head", {"CPU": 1.0, "node:__internal_head__": 1.0}, 1, "m6i.xlarge"),
        NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 3, "g5.2xlarge"),
        NodeType("cpu", {"CPU": 8.0}, 3, "m6i.2xlarge"),
    ]
    mix, price = check(asks, types).cheapest["min"]
    assert mix == {"head": 1, "cpu": 2} and price == pytest.approx(0.192 + 2 * 0.384)


def test_max_replicas_that_overflow_still_fit_at_min() -> None:
    asks = [Ask("embedder", "Embedder", ({"CPU": 2.0},), 1, 8)]
    verdict = check(asks, [NodeType("cpu", {"CPU": 8.0}, 1, None)])
    assert verdict.ok and not verdict.fits_max and len(verdict.unplaced["max"]) == 4


def test_the_platforms_gpu_plan_fits_cluster_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.catalog import CATALOG
    from servegraph.deploy.capacity.inputs import asks_of, cluster_env
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover

    # As the cluster's nodes build it: the placement settings its head exports.
    env = cluster_env(ROOT / "cluster.yaml")
    assert (
        env["SERVEGRAPH_PROFILE"] == "gpu" and HEAD_RESOURCE in env["SERVEGRAPH_ROUTER_RESOURCES"]
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plan = plan_platform(discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True)
    asks = {a.name: a for a in asks_of(plan)}
    llm = next(a for name, a in asks.items() if name.startswith("llm/LLMServer"))
    assert llm.bundles[0]["GPU"] == pytest.approx(0.6) and llm.gpu_memory_fraction == 0.6
    assert asks["embedder/Embedder"].bundles[0]["GPU"] == pytest.approx(0.1)
    assert asks["vector_index/VectorIndex"].bundles[0][HEAD_RESOURCE] > 0  # pinned to the head
    types = node_types(ROOT / "cluster.yaml")
    verdict = check(asks.values(), types)
    assert verdict.ok and verdict.fits_max, report(verdict, types)
    assert verdict.at_risk == {"min": [], "max": []}  # in every arrival order
    assert asks["pipelines/PipelineIngress"].bundles[0][HEAD_RESOURCE] > 0  # routers too
    # Every GPU share went to a GPU worker, none to the CPU head; the index (its SQLite
    # file on local disk) to the head, which the autoscaler never takes away.
    head = [n for n in verdict.placements["max"] if n.kind == "head_cpu"]
    assert all("LLMServer" not in p and "Embedder" not in p for n in head for p in n.placed)
    assert len(head) == 1 and "vector_index/VectorIndex#1" in head[0].placed
    # The cheapest mix that fits: the head and one GPU worker at min, two at max.
    assert verdict.cheapest["min"][0] == {"head_cpu": 1, "worker_gpu": 1}
    assert verdict.cheapest["max"][0] == {"head_cpu": 1, "worker_gpu": 2}
    assert verdict.cheapest["min"][1] == pytest.approx(0.384 + 1.212)


def test_check_exits_non_zero_on_a_cluster_that_cannot_place_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["worker_gpu"]["resources"] = {"CPU": 8, "GPU": 0}
    small = tmp_path / "cpu-only.yaml"
    small.write_text(yaml.safe_dump(config))
    assert main(["check", "--cluster", str(small), "--profile", "gpu"]) == 1
    out = capsys.readouterr().out
    assert "NEVER PLACEABLE" in out and "LLMServer" in out and "cannot be placed" in out
    assert main(["check", "--cluster", str(ROOT / "cluster.yaml"), "--profile", "gpu"]) == 0
