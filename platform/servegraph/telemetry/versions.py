"""A pipeline's versions side by side, from Prometheus: the rows of `servegraph versions`
(issue 28), and what a rollout's gates will read.

Per version and role (primary: it answered the caller; shadow: it ran beside the
primary), over a window: requests, latency p50/p99, the shares of errors, deadline
misses (504) and refusals (503), the cost per request, each answer signal's mean
(`Graph.signals`), and for shadows how alike their answers were to the primary's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Query = Callable[[str], list[dict[str, Any]]]


@dataclass
class VersionFigures:
    version: str
    role: str
    requests: float
    p50_ms: float | None
    p99_ms: float | None
    error_share: float  # 5xx other than 503 and 504
    deadline_miss_share: float  # 504
    refused_share: float  # 503
    usd_per_request: float | None
    signals: dict[str, float] = field(default_factory=dict)  # mean per answered request
    agreement: float | None = None  # shadows: mean agreement with the primary's answer


def compare(query: Query, pipeline: str, window: str) -> list[VersionFigures]:
    """Every version of `pipeline` with requests in `window` (a PromQL duration), primary
    rows first."""
    selector = f'pipeline="{_escape(pipeline)}"'

    def by(expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {
            tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in query(
                f"sum by ({', '.join(labels)}) (increase({expr}{{{selector}}}[{window}]))"
            )
        }

    def quantile(q: float) -> dict[tuple[str, str], float]:
        found = query(
            f"histogram_quantile({q}, sum by (version, role, le) (increase("
            f"ray_servegraph_version_latency_ms_bucket{{{selector}}}[{window}])))"
        )
        return {
            (r["metric"].get("version", ""), r["metric"].get("role", "")): float(r["value"][1])
            for r in found
        }

    statuses = by("ray_servegraph_version_requests_total", "version", "role", "status")
    usd = by("ray_servegraph_version_cost_usd_total", "version", "role")
    signals = by("ray_servegraph_version_signal_total", "version", "role", "signal")
    agreement_sum = by("ray_servegraph_shadow_agreement_sum", "version")
    agreement_count = by("ray_servegraph_shadow_agreement_count", "version")
    p50, p99 = quantile(0.5), quantile(0.99)

    keys = sorted({(v, r) for v, r, _ in statuses}, key=lambda k: (k[1] != "primary", k[0]))
    rows = []
    for version, role in keys:
        counts = {s: n for (v, r, s), n in statuses.items() if (v, r) == (version, role)}
        total = sum(counts.values())
        if total <= 0:
            continue
        answered = counts.get("200", 0.0)
        errors = sum(n for s, n in counts.items() if s.startswith("5") and s not in ("503", "504"))
        spent = usd.get((version, role))
        agreed = agreement_count.get((version,), 0.0) if role == "shadow" else 0.0
        rows.append(
            VersionFigures(
                version,
                role,
                total,
                _finite(p50.get((version, role))),
                _finite(p99.get((version, role))),
                errors / total,
                counts.get("504", 0.0) / total,
                counts.get("503", 0.0) / total,
                spent / total if spent is not None else None,
                {
                    signal: value / answered
                    for (v, r, signal), value in sorted(signals.items())
                    if (v, r) == (version, role) and answered > 0
                },
                agreement_sum.get((version,), 0.0) / agreed if agreed > 0 else None,
            )
        )
    return rows


def _finite(value: float | None) -> float | None:
    """A quantile Prometheus could compute (NaN or +Inf when it could not)."""
    return value if value is not None and math.isfinite(value) else None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
