"""Admission at the ingress door: at most `max_in_flight` requests of a pipeline run at
once in one ingress replica; past that, 503 with Retry-After at once.

Why here and not only downstream: every model server has a bounded queue, but a request
refused there has already cost the ingress its validation, a graph run and a handle
call or two; under a burst of thousands that work starves the event loop, and the
deadline timers of the admitted requests fire late. Refusing at the door costs little,
so what is admitted is answered on time; and each pipeline gets its own share of the
ingress (Serve's `max_ongoing_requests`/`max_queued_requests` on the ingress bound all
pipelines together, and refuse at the proxy before the ingress sees the request).

The same gate runs a second time in front of Serve's proxy (`servegraph.serving.
proxy_answers.FrontDoor`), with each pipeline's limit summed over the ingress replicas
now running, as each publishes its own (`publish_limits`): there a refusal costs a
fraction of a millisecond of the proxy's CPU, where one that reaches the ingress costs
both processes several (issue 23's burst: 1,072 refusals took 2-6 s to reach callers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from servegraph.security.endpoints import json_answer

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

DEFAULT_MAX_IN_FLIGHT = 256
RETRY_AFTER_S = 1

_log = logging.getLogger("ray.serve")


class AdmissionGate:
    """ASGI middleware counting each pipeline's requests in flight (the plain and the
    streamed route together) and refusing those past its limit before any work.

    Args:
        app: the ingress app.
        limits: pipeline name -> requests it may run at once through this gate (read
            on each request: a mapping that changes is followed).
        on_refused: called with the pipeline's name for each refusal (metrics).
        on_arrival: called with the pipeline's name for each request, admitted or
            refused (the demand that graph-aware scaling sizes the servers for).
        pipeline: the pipeline a request runs, or None (not gated).
        where: what the refusal says holds the limit.
        counts: whether a request of a pipeline is counted at all (default: all);
            one that is not passes untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: Mapping[str, int],
        on_refused: Callable[[str], None] | None = None,
        on_arrival: Callable[[str], None] | None = None,
        pipeline: Callable[[Scope], str | None] | None = None,
        where: str = "this ingress replica",
        counts: Callable[[Scope, str], bool] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.in_flight: dict[str, int] = defaultdict(int, dict.fromkeys(limits, 0))
        self._on_refused = on_refused
        self._on_arrival = on_arrival
        self._pipeline = pipeline or pipeline_of
        self._where = where
        self._counts = counts
        # Each pipeline's refusals here (`FrontDoor` lets them go first in a burst).
        self.refusals: dict[str, Refusals] = defaultdict(Refusals)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        name = self._pipeline(scope) if scope["type"] == "http" else None
        limit = self.limits.get(name) if name is not None else None
        if name is None or limit is None or (self._counts and not self._counts(scope, name)):
            await self.app(scope, receive, send)
            return
        if self._on_arrival is not None:
            self._on_arrival(name)
        if self.in_flight[name] >= limit:
            self.refusals[name].note(time.monotonic())
            if self._on_refused is not None:
                try:
                    self._on_refused(name)
                except Exception:  # counting it failed: the caller still gets the 503
                    _log.exception("a refusal of %r was not counted", name)
            await _refuse(send, name, limit, self._where, self.refusal_headers(scope))
            return
        self.in_flight[name] += 1
        try:
            await self.admitted(name, scope, receive, send)
        finally:
            self.in_flight[name] -= 1

    async def admitted(self, name: str, scope: Scope, receive: Any, send: Any) -> None:
        """Runs a request of pipeline `name` the gate let through."""
        await self.app(scope, receive, send)

    def refusal_headers(self, scope: Scope) -> dict[str, str]:
        """Headers a refusal carries besides Retry-After (none here: in the ingress, the
        request id is set by Serve's proxy on the way back)."""
        return {}


# Refusals this far apart (or further) are two floods, not one (`Refusals`): a burst's
# come a fraction of a millisecond apart.
FLOOD_GAP_S = 0.05


@dataclass
class Refusals:
    """A pipeline's refusals at one gate: how many so far, and since when they have
    come with no gap of `FLOOD_GAP_S` (the flood the last one belongs to)."""

    count: int = 0
    last_at: float = -math.inf
    flood_since: float = -math.inf

    def note(self, now: float) -> None:
        if now - self.last_at > FLOOD_GAP_S:
            self.flood_since = now
        self.count += 1
        self.last_at = now


def pipeline_of(scope: Scope) -> str | None:
    """The pipeline a request runs: `POST /<name>` or `POST /<name>/stream`, below the
    app's mount point (Serve mounts the ingress at /pipelines)."""
    if scope.get("method") != "POST":
        return None
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    parts = path.strip("/").split("/")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] == "stream"):
        return parts[0] or None
    return None


async def _refuse(send: Any, name: str, limit: int, where: str, headers: Mapping[str, str]) -> None:
    body = {
        "error": "OverloadedError",
        "node": "(admission)",
        "detail": f"pipeline {name!r} already runs {limit} requests in {where}, its "
        f"max_in_flight; retry after {RETRY_AFTER_S}s",
    }
    await json_answer(send, 503, body, {"retry-after": str(RETRY_AFTER_S), **headers})


# Where the ingress publishes its limits for the proxies: Ray's internal key-value store
# (in the GCS, where Serve keeps its own state, and there for a proxy started later),
# one entry per ingress replica. By hand because Serve has no per-route limit that a
# proxy reads. Each replica publishes again every PUBLISH_S; a proxy sums the entries
# it has seen change within STALE_S by its own clock (the replicas now running, whatever
# their configuration says or their clocks read) and forgets the rest.
_KV_PREFIX = b"admission/"
_KV_NAMESPACE = b"servegraph"
REFRESH_S = 0.5  # how soon a proxy follows a published table (GCS reads)
PUBLISH_S = 5.0
STALE_S = 15.0
FORGET_S = 300.0  # an entry unchanged this long (its replica gone) is deleted


def publish_limits(
    replica: str, prefix: str, limits: Mapping[str, int], scopes: Mapping[str, str]
) -> None:
    """In an ingress replica (a Ray worker) mounted at `prefix`: each pipeline's limit
    in this replica, and the scope a key needs to run it."""
    from ray.experimental import internal_kv

    table = {"prefix": prefix, "limits": dict(limits), "scopes": dict(scopes), "at": time.time()}
    data = json.dumps(table, sort_keys=True).encode()
    key = _KV_PREFIX + replica.encode()
    internal_kv._internal_kv_put(key, data, overwrite=True, namespace=_KV_NAMESPACE)


def publishing(
    replica: str, prefix: str, limits: Mapping[str, int], scopes: Mapping[str, str]
) -> None:
    """Publishes now and every `PUBLISH_S` from a daemon thread (GCS calls, off the
    replica's event loop); a failed publication is logged, never raised."""

    def publish() -> None:
        try:
            publish_limits(replica, prefix, limits, scopes)
        except Exception as exc:  # the proxies keep the last entry until it goes stale
            _log.warning("admission limits not published to the proxies: %s", exc)

    def again() -> None:
        while True:
            time.sleep(PUBLISH_S)
            publish()

    publish()
    threading.Thread(target=again, name="admission-publish", daemon=True).start()


class PublishedLimits(Mapping[str, int]):
    """In a proxy: the sum over the live ingress replicas of each pipeline's limit, as
    they published it, read every `REFRESH_S` by a daemon thread (GCS calls, kept off
    the proxy's event loop) once `start`ed, which also runs `also` each time (the key
    store's refresh). Empty until an ingress replica has published, and when none is
    live: without a table the proxy gates nothing and the ingress's own gate holds."""

    def __init__(
        self, refresh_s: float = REFRESH_S, also: Callable[[], None] | None = None
    ) -> None:
        self._table: dict[str, int] = {}
        self.scopes: dict[str, str] = {}
        self.prefix = ""  # where the ingress is mounted ("": nothing live)
        self._seen: dict[str, tuple[float, float]] = {}  # entry -> (its "at", when it changed)
        self._refresh_s = refresh_s
        self._also = also

    def start(self) -> None:
        threading.Thread(target=self._reading, name="admission-limits", daemon=True).start()

    def _reading(self) -> None:
        from ray.experimental import internal_kv

        failed = False
        while True:
            try:
                entries = {}
                for key in internal_kv._internal_kv_list(_KV_PREFIX, namespace=_KV_NAMESPACE):
                    data = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
                    if data:
                        entries[key.decode()] = json.loads(data)
                for gone in self.take(entries, time.monotonic()):
                    internal_kv._internal_kv_del(gone.encode(), namespace=_KV_NAMESPACE)
                failed = False
            except Exception as exc:  # the GCS restarting: keep the last table
                if not failed:
                    _log.warning("admission limits not read (%s); keeping the last", exc)
                failed = True
            if self._also is not None:
                with contextlib.suppress(Exception):  # its own failures are its own
                    self._also()
            time.sleep(self._refresh_s)

    def take(self, entries: Mapping[str, Mapping[str, Any]], now: float) -> list[str]:
        """Follow the published entries, read at `now` (this process's monotonic clock);
        the entries to forget."""
        live: list[Mapping[str, Any]] = []
        forget = []
        for key, entry in entries.items():
            at = float(entry.get("at", 0.0))
            seen = self._seen.get(key)
            if seen is None or seen[0] != at:
                seen = self._seen[key] = (at, now)
            if now - seen[1] <= STALE_S:
                live.append(entry)
            elif now - seen[1] > FORGET_S:
                forget.append(key)
        for key in [k for k in self._seen if k not in entries]:
            del self._seen[key]
        table: dict[str, int] = {}
        scopes: dict[str, str] = {}
        for entry in live:
            for name, limit in entry.get("limits", {}).items():
                table[str(name)] = table.get(str(name), 0) + int(limit)
            scopes.update({str(k): str(v) for k, v in entry.get("scopes", {}).items()})
        self.scopes, self._table = scopes, table
        self.prefix = str(live[0].get("prefix", "")) if live else ""
        return forget

    def __getitem__(self, name: str) -> int:
        return self._table[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._table.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def pipeline_below(prefix: str, scope: Scope) -> str | None:
    """The pipeline a request to the ingress mounted at `prefix` runs, from a scope that
    is not yet below the mount point (Serve's proxy sees the whole path)."""
    path: str = scope.get("path", "")
    if not prefix or not path.startswith(prefix + "/"):
        return None
    return pipeline_of({"method": scope.get("method"), "path": path[len(prefix) :]})
