"""What each model server should run, from what the pipelines receive. Arithmetic only:
no Ray, no clock of its own (every time is an argument), so it is tested as numbers.

A pipeline knows its downstream calls before they happen: a `rag` request is one
embedder call, one index search and one LLM call. So a server's load is the sum over
pipelines of (arrivals per second) x (calls per request to that server), known the
moment the arrivals change, not after the stage before it has grown and passed the
load on. Calls per request start from the graph (`prior_calls`: switch cases equally
likely, a loop half its iterations) and follow what requests actually did
(`CallMix`), so a switch that always takes one branch, or a loop that stops after one
round, is weighted as it runs.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from servegraph.lang.graph import CallNode, Graph, LoopNode, ParallelNode, SwitchNode

# What one observed request weighs against the prior: after n requests the prior counts
# as PRIOR_WEIGHT of them. Older observations fade by DECAY per request (a memory of
# about 1 / (1 - DECAY) = 1,000 requests), so a change in the traffic's mix shows.
PRIOR_WEIGHT = 20.0
DECAY = 0.999
# Arrivals a short window needs before its rate is believed above the long window's: at
# a slow pipeline's rate, 2 arrivals in 2 s happen by chance every minute or so, and 4
# about once an hour (Poisson at 0.25/s), while a real step brings them within a second
# or two (at hundreds a second, within milliseconds). A benchmark found the LLM asked
# for 3 replicas at a base rate of 0.23/s without this rule (benchmarks.spike).
SHORT_MIN_ARRIVALS = 4


def prior_calls(graph: Graph) -> dict[str, float]:
    """Expected calls per request to each server, from the graph alone: a call node
    counts 1; a parallel node the sum of its branches; a switch the mean of its cases
    (the default included), each equally likely until observed; a loop its body times
    half its `max_iterations` (at least 1). A fallback counts 0: it runs only when its
    node fails."""
    calls: dict[str, float] = defaultdict(float)
    for node in graph.nodes:
        if isinstance(node, CallNode):
            calls[node.server] += 1.0
            continue
        subs = [sub for _, sub in node.children()]
        if not subs:
            continue
        if isinstance(node, SwitchNode):
            weight = 1.0 / len(subs)
        elif isinstance(node, LoopNode):
            weight = max(1.0, node.max_iterations / 2)
        else:
            assert isinstance(node, ParallelNode)
            weight = 1.0
        for sub in subs:
            for server, n in prior_calls(sub).items():
                calls[server] += weight * n
    return dict(calls)


def call_paths(graph: Graph, prefix: str = "") -> dict[str, str]:
    """Each call node's path as a request's records name it, canonical (`canonical`),
    -> its server: how `CallMix.observe` tells which server a record called."""
    paths: dict[str, str] = {}
    for node in graph.nodes:
        path = f"{prefix}{node.name}"
        if isinstance(node, CallNode):
            paths[path] = node.server
        elif isinstance(node, SwitchNode):
            for label, sub in node.children():
                paths |= call_paths(sub, f"{path}/{label}/")
        elif isinstance(node, ParallelNode):
            for name, sub in node.children():
                paths |= call_paths(sub, f"{path}/branch[{name}]/")
        elif isinstance(node, LoopNode):
            paths |= call_paths(node.body, f"{path}/iter/")
    return paths


_ITERATION = re.compile(r"/iter\[\d+\]/")


def canonical(path: str) -> str:
    """A record's node path without its loop iterations: `work/iter[2]/choose` ->
    `work/iter/choose`."""
    return _ITERATION.sub("/iter/", path)


def servers_called(
    graph_paths: Mapping[str, str], records: Iterable[tuple[str, str, str]]
) -> dict[str, int]:
    """The calls one request made to each server, from its records' (node path, kind,
    status): every attempt of a call node counts (a retry is load too), a node stopped
    before it ran (status "budget") does not."""
    made: dict[str, int] = defaultdict(int)
    for path, kind, status in records:
        if kind != "call" or status == "budget":
            continue
        server = graph_paths.get(canonical(path))
        if server is not None:
            made[server] += 1
    return dict(made)


@dataclass
class CallMix:
    """One pipeline's calls per request to each server: the graph's prior, weighted as
    `PRIOR_WEIGHT` requests, blended with what requests did, older ones fading."""

    prior: dict[str, float]
    requests: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)

    def observe(self, requests: int, calls: Mapping[str, float]) -> None:
        """`requests` more requests ended, having made `calls` (server -> calls, all of
        them together)."""
        if requests <= 0:
            return
        fade = DECAY**requests
        self.requests = self.requests * fade + requests
        for server in set(self.totals) | set(calls):
            self.totals[server] = self.totals.get(server, 0.0) * fade + calls.get(server, 0)

    def per_request(self) -> dict[str, float]:
        servers = set(self.prior) | set(self.totals)
        weight = PRIOR_WEIGHT + self.requests
        return {
            s: (self.prior.get(s, 0.0) * PRIOR_WEIGHT + self.totals.get(s, 0.0)) / weight
            for s in servers
        }


@dataclass
class Arrivals:
    """A pipeline's arrivals, counted in buckets of `bucket_s` seconds, kept for
    `keep_s`: rates over any window up to that."""

    bucket_s: float = 0.25
    keep_s: float = 120.0
    buckets: dict[int, float] = field(default_factory=dict)

    def add(self, n: float, now: float) -> None:
        key = math.floor(now / self.bucket_s)
        self.buckets[key] = self.buckets.get(key, 0.0) + n
        oldest = key - math.ceil(self.keep_s / self.bucket_s)
        for stale in [k for k in self.buckets if k < oldest]:
            del self.buckets[stale]

    def count(self, window_s: float, now: float) -> float:
        """Arrivals in the last `window_s` (the bucket in progress included, so a step
        shows within a bucket)."""
        newest = math.floor(now / self.bucket_s)
        span = self._span(window_s)
        return sum(self.buckets.get(k, 0.0) for k in range(newest - span + 1, newest + 1))

    def rate(self, window_s: float, now: float) -> float:
        """Arrivals per second over the last `window_s`."""
        return self.count(window_s, now) / (self._span(window_s) * self.bucket_s)

    def _span(self, window_s: float) -> int:
        return max(1, math.ceil(window_s / self.bucket_s))

    def load(
        self, short_s: float, long_s: float, now: float, min_arrivals: int = SHORT_MIN_ARRIVALS
    ) -> Load:
        """The arrival rates over both windows. A short window holding fewer than
        `min_arrivals` says nothing about a step (two requests a second apart are what a
        slow pipeline's Poisson arrivals often do), so its rate counts only up to the
        long window's: a step is believed once it has brought enough requests."""
        short, long = self.rate(short_s, now), self.rate(long_s, now)
        if self.count(short_s, now) < min_arrivals:
            short = min(short, long)
        return Load(short, long)


@dataclass(frozen=True)
class Load:
    """Calls per second a server can expect: over the short window (a step shows in
    it at once) and the long one (it falls only when arrivals have stayed low)."""

    short: float = 0.0
    long: float = 0.0

    def __add__(self, other: Load) -> Load:
        return Load(self.short + other.short, self.long + other.long)


def server_loads(
    rates: Mapping[str, Load], mixes: Mapping[str, Mapping[str, float]]
) -> dict[str, Load]:
    """Each server's expected calls per second: the sum over pipelines of the
    pipeline's arrival rates (`rates`: pipeline -> Load of requests/s) times its calls
    per request to the server (`mixes`: pipeline -> server -> calls)."""
    loads: dict[str, Load] = {}
    for pipeline, rate in rates.items():
        for server, calls in mixes.get(pipeline, {}).items():
            loads[server] = loads.get(server, Load()) + Load(rate.short * calls, rate.long * calls)
    return loads


def replicas_wanted(
    load: Load,
    *,
    service_time_s: float,
    target_utilisation: float,
    ongoing: float = 0.0,
    target_ongoing: float | None = None,
) -> float:
    """Replicas a server should run (before Serve's bounds and delays): enough that
    the expected calls keep each replica busy `target_utilisation` of the time, a call
    costing a replica `service_time_s` (1 / a replica's calls per second at full
    load). The larger of the two windows' loads, so growth follows a step at once and
    shrinking waits for the long window. And never fewer than the callers' own queue
    asks (`ongoing` requests at `target_ongoing` per replica, Serve's default rule): a
    correction when the service time or the mix is off, or calls come from outside
    the pipelines (a server's own REST route)."""
    predicted = max(load.short, load.long) * service_time_s / target_utilisation
    reactive = ongoing / target_ongoing if target_ongoing else 0.0
    return max(predicted, reactive)
