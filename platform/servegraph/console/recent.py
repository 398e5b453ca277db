"""The recent requests an ingress replica answered, and the figures drawn from them.

Each replica keeps its last `RECENT_REQUESTS` answers in a ring (a `deque` with a
bound: the oldest goes when a new one comes), each with its node records: what the
waterfall of one request draws, and what the per-node figures of a pipeline (rate,
p50/p99, error and deadline-miss share, mean cost) are computed from over a window.
A request is kept with its key's name and tenant, never its key, and without its
input or output (they may hold what the caller would not show an operator).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from servegraph.cost.prices import prices
from servegraph.engine.runtime import NodeRecord

RECENT_REQUESTS = 1000  # per ingress replica: what the console lists and figures from
MAX_ATTEMPTS = 200  # kept per request (a long agent loop's first): the ring's memory bound
MAX_ERROR_CHARS = 300  # of an attempt's error: its kind and start, not a whole traceback

_ids = itertools.count(1)


@dataclass(frozen=True)
class Attempt:
    """One node attempt of a request, as its waterfall draws it."""

    node: str  # qualified: "decide/case[refund]/lookup", "agent/iter[2]/think"
    kind: str
    attempt: int
    status: str
    start_ms: float  # since the request reached the ingress
    wall_ms: float
    error: str | None = None
    tokens: dict[str, int] | None = None
    usd: float = 0.0
    call: dict[str, float] | None = None  # the model server's: batch_size, queue_wait_ms


@dataclass(frozen=True)
class Recent:
    """One answered request, as the console lists it."""

    id: str
    pipeline: str
    version: str
    status: int
    at: float  # unix time it arrived
    total_ms: float
    key: str  # the key's name
    tenant: str
    usd: float
    cache: str | None  # "hit" / "miss" where the pipeline has an answer cache
    trace_id: str | None
    attempts: list[Attempt] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The listing's row: the request without its attempts (not copied)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "attempts"}
        return row | {"nodes": len(self.attempts)}

    def detail(self) -> dict[str, Any]:
        return asdict(self)


def attempts_of(records: Sequence[NodeRecord]) -> list[Attempt]:
    """A request's node records as its waterfall's attempts (the ingress's records count
    from the request's arrival: `Runtime.execute(began=)`)."""
    usd = prices().usd
    return [
        Attempt(
            r.node,
            r.kind,
            r.attempt,
            r.status,
            round(r.start_ms, 3),
            round(r.wall_ms, 3),
            r.error[:MAX_ERROR_CHARS] if r.error else None,
            r.usage,
            usd(r.charge) if r.charge else 0.0,
            r.call,
        )
        for r in records
    ]


class RecentRequests:
    """A replica's ring of its last `size` answered requests."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self.ring: deque[Recent] = deque(maxlen=size)
        self.started = time.time()  # what the ring can cover begins here

    def covered(self, window_s: float, now: float | None = None) -> float:
        """How much of the last `window_s` the ring holds every request of: all of it,
        unless this replica started since, or the ring is full and its oldest request
        came later (at 10 requests/s, 1,000 cover 100 s). Rates divide by this."""
        now = now if now is not None else time.time()
        since = max(now - window_s, self.started)
        if len(self.ring) == self.ring.maxlen and self.ring:
            since = max(since, self.ring[0].at)
        return max(now - since, 1e-3)

    def add(
        self,
        pipeline: str,
        version: str,
        status: int,
        *,
        arrived: float,
        total_ms: float,
        key: str,
        tenant: str,
        records: Sequence[NodeRecord],
        cache: str | None = None,
        trace_id: str | None = None,
    ) -> Recent:
        attempts = attempts_of(records[:MAX_ATTEMPTS])
        recent = Recent(
            f"{int(arrived * 1000):x}-{next(_ids)}",
            pipeline,
            version,
            status,
            arrived,
            round(total_ms, 3),
            key,
            tenant,
            sum(a.usd for a in attempts),
            cache,
            trace_id,
            attempts,
        )
        self.ring.append(recent)  # deque.append: atomic, so the event loop and threads may add
        return recent

    # `tenant` below: only that tenant's requests (a key that is not an admin sees its
    # own tenant's, as with runs waiting for approval); None: every tenant's.

    def latest(
        self,
        pipeline: str | None = None,
        limit: int = RECENT_REQUESTS,
        tenant: str | None = None,
    ) -> list[Recent]:
        """The newest first, of one pipeline or of all."""
        rows = [
            r
            for r in reversed(self.ring)
            if (pipeline is None or r.pipeline == pipeline) and tenant in (None, r.tenant)
        ]
        return rows[:limit]

    def get(self, request_id: str, tenant: str | None = None) -> Recent | None:
        return next(
            (r for r in reversed(self.ring) if r.id == request_id and tenant in (None, r.tenant)),
            None,
        )

    def window(
        self,
        pipeline: str,
        window_s: float,
        now: float | None = None,
        tenant: str | None = None,
    ) -> list[Recent]:
        since = (now if now is not None else time.time()) - window_s
        return [
            r
            for r in self.ring
            if r.pipeline == pipeline and r.at > since and tenant in (None, r.tenant)
        ]


# A qualified node name with its sub-graph labels ("case[refund]", "branch[web]",
# "iter[3]") as the drawing names the node: the case, the branch, or the loop's "body".
_LABEL = re.compile(r"/(case|branch|iter)\[([^\]]*)\]/")


def drawn_name(qualified: str) -> str:
    """The name of the drawn node a record's node is: "decide/case[refund]/lookup" ->
    "decide/refund/lookup", every iteration of a loop's node -> "agent/body/think"."""

    def label(match: re.Match[str]) -> str:
        kind, value = match.groups()
        return "/body/" if kind == "iter" else f"/{value}/"

    return _LABEL.sub(label, qualified)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank quantile: the smallest value with at least `q` of them at or below."""
    index = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _figures(
    walls: list[float], failed: int, missed: int, usd: float, span_s: float, fallbacks: int = 0
) -> dict[str, Any]:
    walls.sort()
    n = len(walls)
    return {
        "count": n,
        "rate_per_s": round(n / span_s, 4) if span_s > 0 else 0.0,
        "p50_ms": round(_quantile(walls, 0.5), 2) if n else None,
        "p99_ms": round(_quantile(walls, 0.99), 2) if n else None,
        "error_share": round(failed / n, 4) if n else None,
        "deadline_share": round(missed / n, 4) if n else None,
        "fallback_share": round(fallbacks / n, 4) if n else None,
        "mean_usd": usd / n if n else None,
    }


_FAILED = {"error", "timeout", "budget", "cancelled"}


def figures(requests: Iterable[Recent], span_s: float) -> dict[str, Any]:
    """A pipeline's figures over `requests` (a window of the ring, covering `span_s`
    seconds: `RecentRequests.covered`): the whole pipeline's (rate of requests, p50/p99
    of their wall time, the share answered 5xx and the share that missed their deadline
    with 504, mean cost) and each drawn node's (its attempts: the same, a failed attempt
    being one that erred, timed out or was stopped; a fallback that ran is not an
    attempt but counts in its `fallback_share`)."""
    requests = list(requests)
    walls = [r.total_ms for r in requests]
    whole = _figures(
        walls,
        sum(r.status >= 500 for r in requests),
        sum(r.status == 504 for r in requests),
        sum(r.usd for r in requests),
        span_s,
    )
    by_node: dict[str, tuple[list[float], list[int]]] = {}
    node_usd: dict[str, float] = {}
    names: dict[str, str] = {}  # qualified -> drawn: a loop repeats its nodes' names
    for request in requests:
        for a in request.attempts:
            name = names.get(a.node) or names.setdefault(a.node, drawn_name(a.node))
            node_walls, counts = by_node.setdefault(name, ([], [0, 0, 0]))
            node_usd[name] = node_usd.get(name, 0.0) + a.usd
            if a.status == "fallback":
                counts[2] += 1
                continue
            node_walls.append(a.wall_ms)
            counts[0] += a.status in _FAILED
            counts[1] += a.status == "timeout"
    nodes = {
        name: _figures(node_walls, failed, missed, node_usd[name], span_s, fallbacks)
        for name, (node_walls, (failed, missed, fallbacks)) in by_node.items()
    }
    return {"covered_s": round(span_s, 3), "pipeline": whole, "nodes": nodes}
