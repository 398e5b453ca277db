"""Per-pipeline and per-node metrics through Ray Serve's metrics API, so they appear in
the Ray dashboard and on Ray's Prometheus endpoint (names gain a ``ray_`` prefix there).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

from servegraph.cost.prices import prices
from servegraph.engine.runtime import NodeRecord
from servegraph.tenants import DEFAULT_TENANT

logger = logging.getLogger("ray.serve")

# _TAGS: Ray annotates `tag_keys` as Tuple[str], a 1-tuple; it takes any number.
_LATENCY_MS = [1.0, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
_ITERATION = re.compile(r"\[\d+\]")


class Coalesced:
    """Counter increments summed per series in this process and handed to Ray's counters
    at most once a second (`every_s`), in place of one `Counter.inc` per request.

    By hand because Ray's metrics API has no batching for user metrics: each `inc` checks
    its tags, merges Serve's default tags and calls into the core worker, which cost the
    busiest gateway about 6 % of its CPU at a few hundred requests per second (Serve
    records its own per-request metrics this way too, `ReplicaMetricsManager`'s cached
    metrics). A series' count reaches Ray within `every_s` of its first increment; what
    is summed but not yet handed on when the process ends is lost, as is what Ray had
    not yet exported."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[Any, tuple[tuple[str, str], ...]], float] = {}
        self._scheduled = False

    def counter(self, counter: Any) -> _CoalescedCounter:
        return _CoalescedCounter(counter, self)

    def add(self, counter: Any, value: float, tags: dict[str, str] | None) -> None:
        if not value > 0:  # Ray's counters refuse them; summed, one would cost the others
            return
        series = (counter, tuple(sorted(tags.items())) if tags else ())
        with self._lock:
            self._pending[series] = self._pending.get(series, 0.0) + value
            if self._scheduled:
                return
            self._scheduled = True
        try:
            asyncio.get_running_loop().call_later(self.every_s, self.flush)
        except RuntimeError:  # no event loop in this thread: hand it on at once
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, {}, False
        for (counter, tags), value in pending.items():
            try:
                counter.inc(value, tags=dict(tags) or None)
            except Exception:  # one series refused (a tag Ray rejects): not the others
                logger.exception("a coalesced metric was refused; its count is dropped")


def _counter(
    coalesced: Coalesced, name: str, description: str, *tag_keys: str
) -> _CoalescedCounter:
    """A Ray Serve counter (this replica's), incremented through `coalesced`."""
    from ray.serve import metrics

    counter = metrics.Counter(name, description=description, tag_keys=tag_keys)  # type: ignore[arg-type]  # see _TAGS
    return coalesced.counter(counter)


class _CoalescedCounter:
    """A Ray counter's `inc`, through `Coalesced`."""

    def __init__(self, counter: Any, coalesced: Coalesced) -> None:
        self._counter = counter
        self._coalesced = coalesced

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._coalesced.add(self._counter, value, tags)


class ProxyRefusals:
    """In Serve's proxy (`servegraph.serving.proxy_answers.FrontDoor`): the pipeline
    requests it refused, in the ingress's own series (`servegraph_pipeline_requests`,
    status 503, the same tag keys) with `deployment="proxy"`, so the dashboards and
    alerts count them with the rest. Not a Serve metric: the proxy is no replica."""

    def __init__(self) -> None:
        import ray
        from ray.util import metrics

        counter = metrics.Counter(
            "servegraph_pipeline_requests",
            description="Pipeline requests by outcome.",
            tag_keys=("deployment", "replica", "application", "pipeline", "status"),
        )
        node = ray.get_runtime_context().get_node_id()[:8]
        counter.set_default_tags(
            {"deployment": "proxy", "replica": f"proxy-{node}", "application": "pipelines"}
        )
        self._requests = Coalesced().counter(counter)

    def refused(self, pipeline: str) -> None:
        self._requests.inc(tags={"pipeline": pipeline, "status": "503"})


class PipelineMetrics:
    """Requests, errors, latency per pipeline and node; LLM tokens. Create in a replica."""

    def __init__(self) -> None:
        from ray.serve import metrics

        coalesced = Coalesced()
        self.requests = _counter(
            coalesced,
            "servegraph_pipeline_requests",
            "Pipeline requests by outcome.",
            "pipeline",
            "status",
        )
        self.latency = metrics.Histogram(
            "servegraph_pipeline_latency_ms",
            description="Pipeline request latency.",
            boundaries=_LATENCY_MS,
            tag_keys=("pipeline",),
        )
        self.node_latency = metrics.Histogram(
            "servegraph_node_latency_ms",
            description="Node attempt latency.",
            boundaries=_LATENCY_MS,
            tag_keys=("pipeline", "node", "kind"),  # type: ignore[arg-type]
        )
        self.node_errors = _counter(
            coalesced,
            "servegraph_node_errors",
            "Failed node attempts.",
            "pipeline",
            "node",
        )
        self.llm_tokens = _counter(
            coalesced,
            "servegraph_llm_tokens",
            "LLM tokens; rate() gives tokens/s.",
            "pipeline",
            "direction",
        )
        self.resource_seconds = _counter(
            coalesced,
            "servegraph_node_resource_seconds",
            "Model-server resource-seconds charged to requests (servegraph.cost).",
            "pipeline",
            "node",
            "resource",
        )
        self.usd = _counter(
            coalesced,
            "servegraph_node_cost_usd",
            "What the charged resource-seconds cost, by the price table.",
            "pipeline",
            "node",
        )
        self.joules = _counter(
            coalesced,
            "servegraph_node_energy_joules",
            "The charged resource-seconds' energy, by the power table.",
            "pipeline",
            "node",
        )
        # Per version of a pipeline (issue 28), as a rollout compares them: `role` is
        # "primary" for the version that answered the caller, "shadow" for one that ran
        # beside it. (Series of their own: the requests above keep their labels, which
        # Serve's proxies count too, before a version is chosen.)
        self.version_requests = _counter(
            coalesced,
            "servegraph_version_requests",
            "Pipeline requests by version, role (primary or shadow) and outcome.",
            "pipeline",
            "version",
            "role",
            "status",
        )
        self.version_latency = metrics.Histogram(
            "servegraph_version_latency_ms",
            description="Pipeline request latency by version and role.",
            boundaries=_LATENCY_MS,
            tag_keys=("pipeline", "version", "role"),  # type: ignore[arg-type]  # see _TAGS
        )
        self.version_usd = _counter(
            coalesced,
            "servegraph_version_cost_usd",
            "What a version's requests cost, by the price table.",
            "pipeline",
            "version",
            "role",
        )
        self.version_signals = _counter(
            coalesced,
            "servegraph_version_signal",
            "The sum of an answer signal over a version's answers (Graph.signals): its "
            "mean is this rate over the rate of the version's 200s.",
            "pipeline",
            "version",
            "role",
            "signal",
        )
        self.cache_lookups = _counter(
            coalesced,
            "servegraph_cache_lookups",
            "Answer-cache lookups by result (hit, miss; bypass: Cache-Control: no-cache), "
            "per tenant: the hit rate is hits over hits and misses.",
            "pipeline",
            "version",
            "tenant",
            "result",
        )
        self.cache_saved_usd = _counter(
            coalesced,
            "servegraph_cache_saved_usd",
            "What the answers served from the cache had cost to make: the cost avoided.",
            "pipeline",
            "version",
            "tenant",
        )
        self.shadow_agreement = metrics.Histogram(
            "servegraph_shadow_agreement",
            description="How alike a shadow's answer was to the primary's (1: the same).",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99],
            tag_keys=("pipeline", "version"),  # type: ignore[arg-type]  # see _TAGS
        )
        self.prices = prices()

    def record_version(
        self,
        pipeline: str,
        version: str,
        role: str,
        status: int,
        total_ms: float,
        records: list[NodeRecord],
    ) -> None:
        tags = {"pipeline": pipeline, "version": version, "role": role}
        self.version_requests.inc(tags={**tags, "status": str(status)})
        self.version_latency.observe(total_ms, tags=tags)
        if usd := sum(self.prices.usd(r.charge) for r in records if r.charge):
            self.version_usd.inc(usd, tags=tags)

    def record_signals(
        self, pipeline: str, version: str, role: str, signals: dict[str, float]
    ) -> None:
        tags = {"pipeline": pipeline, "version": version, "role": role}
        for signal, value in signals.items():
            if value:  # a counter takes no zero; a mean's zeros are the 200s without it
                self.version_signals.inc(value, tags={**tags, "signal": signal})

    def record_cache(
        self, pipeline: str, version: str, tenant: str, result: str, saved_usd: float = 0.0
    ) -> None:
        tags = {"pipeline": pipeline, "version": version, "tenant": tenant}
        self.cache_lookups.inc(tags={**tags, "result": result})
        if saved_usd > 0:
            self.cache_saved_usd.inc(saved_usd, tags=tags)

    def record_agreement(self, pipeline: str, version: str, agreement: float) -> None:
        self.shadow_agreement.observe(agreement, tags={"pipeline": pipeline, "version": version})

    def record(
        self, pipeline: str, status: int, total_ms: float, records: list[NodeRecord]
    ) -> None:
        self.requests.inc(tags={"pipeline": pipeline, "status": str(status)})
        self.latency.observe(total_ms, tags={"pipeline": pipeline})
        for record in records:
            node = _ITERATION.sub("", record.node)  # loop iterations share one series
            self.node_latency.observe(
                record.wall_ms, tags={"pipeline": pipeline, "node": node, "kind": record.kind}
            )
            if record.status in ("error", "timeout"):
                self.node_errors.inc(tags={"pipeline": pipeline, "node": node})
            for direction, tokens in (record.usage or {}).items():
                if tokens > 0:  # a counter takes no zero (a reply of no tokens)
                    tags = {"pipeline": pipeline, "direction": direction}
                    self.llm_tokens.inc(tokens, tags=tags)
            if record.charge:
                tags = {"pipeline": pipeline, "node": node}
                for resource, seconds in record.charge.items():
                    if seconds > 0:
                        self.resource_seconds.inc(seconds, tags={**tags, "resource": resource})
                if usd := self.prices.usd(record.charge):  # a counter takes no zero
                    self.usd.inc(usd, tags=tags)
                    self.joules.inc(self.prices.joules(record.charge), tags=tags)


def batch_size_histogram(server: str) -> Any:
    """A histogram of dynamic-batch sizes for a model server replica (None outside Ray)."""
    return _server_histogram(
        "servegraph_batch_size",
        "Items per dynamic batch.",
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
        server,
    )


def batch_wait_histogram(server: str) -> Any:
    """A histogram of how long each item waited in the batch queue before its batch ran
    (None outside Ray)."""
    return _server_histogram(
        "servegraph_batch_queue_wait_ms",
        "Time an item waited for its dynamic batch to start.",
        [0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500],
        server,
    )


def _server_histogram(name: str, description: str, boundaries: list[float], server: str) -> Any:
    try:
        from ray.serve import metrics

        histogram = metrics.Histogram(
            name, description=description, boundaries=boundaries, tag_keys=("server",)
        )
        histogram.set_default_tags({"server": server})
        return histogram
    except Exception:  # not inside a Ray worker (in-process use): no metrics
        return None


class KeyUsageMetrics:
    """Usage per API key, labelled with the key's name (never the key) and the tenant
    the request ran for (`servegraph.tenants`; an admin key acting for another tenant
    counts there): requests by status, LLM tokens by direction, cost."""

    def __init__(self) -> None:
        coalesced = Coalesced()
        self.requests = _counter(
            coalesced,
            "servegraph_key_requests",
            "Requests per API key name and tenant, by HTTP status.",
            "key",
            "tenant",
            "status",
        )
        self.tokens = _counter(
            coalesced,
            "servegraph_key_llm_tokens",
            "LLM tokens per API key name and tenant; rate() gives tokens/s.",
            "key",
            "tenant",
            "direction",
        )
        self.usd = _counter(
            coalesced,
            "servegraph_key_cost_usd",
            "What the key's pipeline requests cost (servegraph.cost), per tenant.",
            "key",
            "tenant",
        )

    @classmethod
    def create(cls) -> KeyUsageMetrics | _NoMetrics:
        try:
            return cls()
        except Exception:  # not inside a Ray worker (in-process use): no metrics
            return _NoMetrics()

    def record(
        self,
        key: str,
        status: int,
        tokens: dict[str, int] | None = None,
        usd: float = 0.0,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        who = {"key": key, "tenant": tenant}
        self.requests.inc(tags={**who, "status": str(status)})
        for direction, n in (tokens or {}).items():
            if n:
                self.tokens.inc(n, tags={**who, "direction": direction})
        if usd > 0:
            self.usd.inc(usd, tags=who)


class _NoMetrics:
    def record(
        self,
        key: str,
        status: int,
        tokens: dict[str, int] | None = None,
        usd: float = 0.0,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        pass
