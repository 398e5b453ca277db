"""The model servers as the console shows them: each Serve deployment's replicas now, as
Serve's controller reports them (`servegraph._serve_status`), and over the window its
replicas, queue, requests in progress and batch sizes, with the scale events read from
the replica series, from Prometheus (`AppSettings.prometheus_url`, `make observe`'s by
default). When no Prometheus answers, the answer says so, with the reason, and the
page says it rather than drawing empty charts.

Asked at most every `TTL_S` per ingress replica (a page refreshing every few seconds, in
several tabs, costs Serve's controller and Prometheus one query set per replica).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import Any

import httpx

from servegraph._serve_status import serve_state
from servegraph.settings import AppSettings

TTL_S = 5.0
_STEP_S = 15  # the range queries' resolution: every 15 s over the window
# Per deployment (Serve's own metrics and ours, all tagged with application and
# deployment by Serve): what the page charts.
SERIES = {
    "replicas": "sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
    "queued": "sum by (application, deployment) (ray_serve_deployment_queued_queries)",
    "ongoing": "sum by (application, deployment) (ray_serve_replica_processing_queries)",
    "batch_size": (
        "sum by (application, deployment) (rate(ray_servegraph_batch_size_sum[1m]))"
        " / sum by (application, deployment) (rate(ray_servegraph_batch_size_count[1m]))"
    ),
}


STATUS_TIMEOUT_S = 5.0  # Serve's controller, asked from a thread


class ModelServers:
    """What `/console/api/servers` answers, kept for `TTL_S` per window (the caller
    picks among a few: `servegraph.console.routes.Window`); callers arriving while it is
    being asked wait for that one answer rather than asking again."""

    def __init__(self, prometheus_url: str | None = None) -> None:
        self.url = (prometheus_url or AppSettings().prometheus_url).rstrip("/")
        self.shown_url = _without_userinfo(self.url)
        self.kept: dict[int, tuple[float, dict[str, Any]]] = {}
        self.status: tuple[float, dict[str, Any]] = (0.0, {})
        self.lock = asyncio.Lock()

    async def get(self, window_s: int) -> dict[str, Any]:
        async with self.lock:
            at, answer = self.kept.get(window_s, (0.0, {}))
            if time.monotonic() - at > TTL_S:
                now, history = await asyncio.gather(self._status(), self.history(window_s))
                answer = {**now, "prometheus": history}
                self.kept[window_s] = (time.monotonic(), answer)
            return answer

    async def _status(self) -> dict[str, Any]:
        at, status = self.status
        if time.monotonic() - at > TTL_S:
            try:
                status = await asyncio.wait_for(asyncio.to_thread(serve_status), STATUS_TIMEOUT_S)
            except TimeoutError:
                status = {"available": False, "reason": "Serve's controller did not answer"}
                status["servers"] = []
            self.status = (time.monotonic(), status)
        return status

    async def history(self, window_s: int) -> dict[str, Any]:
        """Each series over the window by deployment ("application/deployment"), and the
        scale events in it; or why there is none."""
        end = time.time()
        params = {"start": end - window_s, "end": end, "step": _STEP_S}
        series: dict[str, dict[str, list[list[float]]]] = {}
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=3) as client:
                answers = await asyncio.gather(
                    *(
                        client.get("/api/v1/query_range", params={**params, "query": q})
                        for q in SERIES.values()
                    )
                )
            for name, answer in zip(SERIES, answers, strict=True):
                answer.raise_for_status()
                for row in answer.json()["data"]["result"]:
                    labels = row["metric"]
                    deployment = f"{labels.get('application', '')}/{labels.get('deployment', '')}"
                    # A ratio of two rates is NaN where nothing happened: no point there
                    # (and JSON has no NaN).
                    points = [
                        [float(t), float(v)] for t, v in row["values"] if math.isfinite(float(v))
                    ]
                    series.setdefault(deployment, {})[name] = points
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            return {  # the error's kind, not its text (which may hold the URL's userinfo)
                "available": False,
                "url": self.shown_url,
                "reason": type(exc).__name__,
            }
        return {
            "available": True,
            "url": self.shown_url,
            "window_s": window_s,
            "series": series,
            "events": {d: scale_events(s.get("replicas", [])) for d, s in series.items()},
        }


def scale_events(points: list[list[float]]) -> list[dict[str, float]]:
    """Where a replica series changes: when, from how many, to how many."""
    events = []
    for (_, before), (at, after) in itertools.pairwise(points):
        if after != before:
            events.append({"at": at, "from": before, "to": after})
    return events


def serve_status() -> dict[str, Any]:
    """Every deployment's state and replicas now, from Serve's controller."""
    try:
        import ray

        if not ray.is_initialized():  # Serve's client would start a Ray of its own
            raise RuntimeError("this process is not on Ray")
        status = serve_state()
    except Exception as exc:  # not on Ray (an ingress built in a test), or the controller away
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}", "servers": []}
    rows = []
    for app_name, app in status.applications.items():
        for name, deployment in app.deployments.items():
            replicas = dict(deployment.replica_states)
            rows.append(
                {
                    "application": app_name,
                    "deployment": name,
                    "status": deployment.status,
                    "replicas": replicas,
                    "running": replicas.get("RUNNING", 0),
                }
            )
    return {"available": True, "at": time.time(), "servers": rows}


def _without_userinfo(url: str) -> str:
    """`url` without a user:password@ part, to show."""
    parts = httpx.URL(url)
    return str(parts.copy_with(username=None, password=None)) if parts.userinfo else url
