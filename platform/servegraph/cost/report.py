"""Cost and energy per 1,000 requests of each pipeline, from Prometheus: the rows of
`servegraph cost`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class PipelineCost:
    """`servegraph cost`'s row: a pipeline's requests in the window, and its cost and
    energy per 1,000 requests, in all and per node."""

    pipeline: str
    requests: float
    usd_per_1000: float
    wh_per_1000: float
    nodes_usd_per_1000: dict[str, float]


def per_thousand(query: Callable[[str], list[dict[str, Any]]], window: str) -> list[PipelineCost]:
    """Cost and energy per 1,000 requests of each pipeline over `window` (a PromQL
    duration, e.g. "1h"), from the metrics (`query`: a Prometheus instant query)."""

    def by(expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {
            tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in query(f"sum by ({', '.join(labels)}) (increase({expr}[{window}]))")
        }

    requests = by("ray_servegraph_pipeline_requests_total", "pipeline")
    usd = by("ray_servegraph_node_cost_usd_total", "pipeline", "node")
    joules = by("ray_servegraph_node_energy_joules_total", "pipeline", "node")
    rows = []
    for (pipeline,), count in sorted(requests.items()):
        if count <= 0:
            continue
        nodes = {node: v for (p, node), v in usd.items() if p == pipeline}
        spent_j = sum(v for (p, _), v in joules.items() if p == pipeline)
        rows.append(
            PipelineCost(
                pipeline,
                count,
                1000 * sum(nodes.values()) / count,
                1000 * spent_j / 3600 / count,
                {node: 1000 * v / count for node, v in sorted(nodes.items())},
            )
        )
    return rows
