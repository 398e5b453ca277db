"""`servegraph versions`' arithmetic, from what Prometheus answers (the queries' results
as Prometheus returns them; that the metrics reach a real Prometheus and these queries
find them is tests/integration/test_observe.py)."""

from __future__ import annotations

from typing import Any

from servegraph.telemetry.versions import compare


def series(value: float, **labels: str) -> dict[str, Any]:
    return {"metric": labels, "value": [0, str(value)]}


def prometheus(expr: str) -> list[dict[str, Any]]:
    assert 'pipeline="rag"' in expr, expr
    if "histogram_quantile(0.5," in expr:
        return [
            series(900, version="v1", role="primary"),
            series(1200, version="v2", role="primary"),
        ]
    if "histogram_quantile(0.99," in expr:
        return [
            series(4000, version="v1", role="primary"),
            series(float("nan"), version="v2", role="primary"),
        ]
    if "version_requests_total" in expr:
        return [
            series(90, version="v1", role="primary", status="200"),
            series(5, version="v1", role="primary", status="504"),
            series(3, version="v1", role="primary", status="503"),
            series(2, version="v1", role="primary", status="502"),
            series(10, version="v2", role="primary", status="200"),
            series(80, version="v2", role="shadow", status="200"),
        ]
    if "version_cost_usd_total" in expr:
        return [series(0.002, version="v1", role="primary")]
    if "version_signal_total" in expr:
        return [
            series(45, version="v1", role="primary", signal="generated"),
            series(9, version="v2", role="primary", signal="generated"),
        ]
    if "agreement_sum" in expr:
        return [series(60, version="v2")]
    if "agreement_count" in expr:
        return [series(80, version="v2")]
    return []


def test_each_version_and_role_gets_its_shares_means_and_agreement() -> None:
    rows = {(r.version, r.role): r for r in compare(prometheus, "rag", "15m")}
    assert list(rows) == [("v1", "primary"), ("v2", "primary"), ("v2", "shadow")]
    v1, v2, shadow = rows.values()
    assert v1.requests == 100 and (v1.p50_ms, v1.p99_ms) == (900, 4000)
    assert (v1.error_share, v1.deadline_miss_share, v1.refused_share) == (0.02, 0.05, 0.03)
    assert v1.usd_per_request == 0.002 / 100 and v1.signals == {"generated": 0.5}
    assert v2.p99_ms is None and v2.signals == {"generated": 0.9}  # NaN: too few samples
    assert v2.agreement is None and shadow.agreement == 0.75
