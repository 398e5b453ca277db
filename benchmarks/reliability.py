"""The reliability figures of the overload-and-faults issue, at its sizes, in one run on a
fresh local cluster (all model servers and pipelines, the knowledge base ingested):

- an overload burst: 1,200 concurrent `POST /pipelines/triage` at a 20 s deadline;
- concurrent ingest: 8 callers x 30 single-document `rag_ingest` requests;
- `kill -9` of the embedder's replica under load, through a pipeline (8 callers on
  `rag_ingest`) and on the embedder's own route (16 callers on `/embedder/embed_one`).

    .venv/bin/python -m benchmarks.reliability [step ...]   (default: every step)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from typing import Any

from benchmarks import cpu
from benchmarks.traffic import (
    Answer,
    callers,
    kill_under_load,
    proxy_gating,
    raw_burst,
    replica_pids,
)

BURST, BURST_DEADLINE_S, MARGIN_S = 1200, 20, 5


def summary(answers: list[Answer], deadline_s: float | None = None) -> dict[str, Any]:
    statuses = Counter(a.status for a in answers)
    out: dict[str, Any] = {"n": len(answers), "statuses": dict(sorted(statuses.items()))}
    out["bare_500"] = sum(1 for a in answers if a.status == 500 and not isinstance(a.body, dict))
    out["success"] = round(statuses[200] / len(answers), 5) if answers else None
    if deadline_s is not None:
        within = sum(1 for a in answers if a.status and a.seconds <= deadline_s + MARGIN_S)
        out["answered_within_deadline_plus_5s"] = round(within / len(answers), 4)
    out |= _by_status(answers, lambda a: a.seconds, "")
    out["max_s"] = round(max(a.seconds for a in answers), 2) if answers else None
    # the same, from when each request was written (the client's own delay left out)
    out |= _by_status(answers, lambda a: a.since_written, "_since_written")
    if deadline_s is not None:
        out["later_than_deadline_plus_5s"] = sum(
            1 for a in answers if a.seconds > deadline_s + MARGIN_S
        )
    shed = [a for a in answers if a.status == 503]
    out["503_with_retry_after"] = sum(1 for a in shed if a.headers and "retry-after" in a.headers)
    out["503_refused_by"] = dict(Counter(_refused_by(a.body) for a in shed))
    return out


def _by_status(answers: list[Answer], seconds: Any, suffix: str) -> dict[str, Any]:
    """p50 and p99 of `seconds(answer)` per status (answers it gives None left out)."""
    by_status: dict[int, list[float]] = {}
    for a in answers:
        if (value := seconds(a)) is not None:
            by_status.setdefault(a.status, []).append(value)
    if not by_status:
        return {}
    return {
        f"p50_s_by_status{suffix}": {
            s: round(statistics.median(v), 2) for s, v in by_status.items()
        },
        f"p99_s_by_status{suffix}": {
            s: round(sorted(v)[min(len(v) - 1, int(len(v) * 0.99))], 2)
            for s, v in by_status.items()
        },
    }


def _refused_by(body: Any) -> str:
    """Which part of the platform a 503's body says refused it."""
    if not isinstance(body, dict):
        return "serve"  # Serve's own backpressure answer, plain text
    detail = str(body.get("detail", ""))
    if "this proxy" in detail:
        return "proxy front door"
    if "ingress replica" in detail:
        return "ingress"
    return str(body.get("node", "?"))


def llm_running(metrics_url: str) -> float | None:
    """vLLM's requests in its running batch, from Ray's Prometheus endpoint."""
    import httpx

    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_vllm_num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def overload_burst(base_url: str) -> dict[str, Any]:
    """`BURST` concurrent `triage` requests at a `BURST_DEADLINE_S` deadline from one
    raw-socket client, timed from the caller's side: the answers' summary and the
    client's own CPU."""
    tickets = [
        {"text": f"My invoice {n} shows a charge I do not recognise.", "email": "ana@example.com"}
        for n in range(BURST)
    ]
    answers, client_cpu_s = asyncio.run(
        raw_burst(
            base_url,
            "/pipelines/triage",
            tickets,
            headers={"X-Request-Timeout": str(BURST_DEADLINE_S)},
            client_timeout_s=BURST_DEADLINE_S + 120,
        )
    )
    out = summary(answers, BURST_DEADLINE_S)
    out["client_cpu_s"] = round(client_cpu_s, 2)  # the load generator's own CPU
    return out


def overload(base_url: str, metrics_url: str) -> dict[str, Any]:
    proxy_gating(base_url)
    with cpu.measured() as used:
        out = overload_burst(base_url)
    out["cpu_by_process"] = used[0].rows()
    # Timed-out requests are cancelled downstream: vLLM's running batch empties once
    # the 504s are out (Ray exports gauges every few seconds; sampled for 15 s).
    samples = []
    for _ in range(15):
        samples.append(llm_running(metrics_url))
        time.sleep(1)
    out["llm_requests_running_each_second_after"] = samples
    return out


def concurrent_ingest(base_url: str) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]

    def body(c: int, i: int) -> dict:
        text = f"Note {i} by writer {c}. " * 20
        return {"documents": [{"id": f"{run}/w{c}/d{i}", "text": text}]}

    answers = asyncio.run(
        callers(
            base_url,
            "/pipelines/rag_ingest",
            body,
            n=8,
            stop=asyncio.Event(),
            max_requests=240,
            max_seconds=600,
        )
    )
    return summary(answers)


def kill_embedder(
    base_url: str, dashboard_url: str, path: str, n: int, body: Any
) -> dict[str, Any]:
    run = kill_under_load(
        base_url,
        path,
        body,
        replicas=lambda: replica_pids(dashboard_url, "embedder", "Embedder"),
        n=n,
        before=200,
        after=200,
        headers={"X-Request-Timeout": "60"},
    )
    return summary(run.answers) | {"replica_back_after_s": round(run.replica_back_after_s, 1)}


def main(only: list[str]) -> None:
    from benchmarks.platform_up import serving_everything

    results: dict[str, Any] = {}
    with serving_everything() as cluster:
        base = cluster.base_url
        dash = str(cluster.dashboard_url)
        steps = {
            "overload_burst_1200_at_20s": lambda: overload(base, cluster.metrics_url),
            "concurrent_ingest_8x30": lambda: concurrent_ingest(base),
            "kill_embedder_via_pipeline_8_callers": lambda: kill_embedder(
                base,
                dash,
                "/pipelines/rag_ingest",
                8,
                lambda c, i: {
                    "documents": [{"id": f"kill/c{c}/d{i}", "text": f"Note {i} of caller {c}."}]
                },
            ),
            "kill_embedder_direct_route_16_callers": lambda: kill_embedder(
                base, dash, "/embedder/embed_one", 16, lambda c, i: {"text": f"ticket {c}-{i}"}
            ),
        }
        for name, step in steps.items():
            if only and not any(name.startswith(o) for o in only):
                continue
            print(f"[reliability] {name} ...", flush=True)
            results[name] = step()
            print(json.dumps({name: results[name]}, indent=1), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
