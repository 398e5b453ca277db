"""The demand board: one actor in the cluster that every ingress replica tells what
arrived and what the finished requests called, and that Serve's controller asks for
each model server's expected load (`servegraph.deploy.scaling.policy`).

Why an actor of our own: the load a server will see is known at the ingress, and
Serve's autoscaling hooks do not carry it there. An application-level policy sees only
its own application's deployments, and every model server is an application of its
own (its own route); a replica's custom autoscaling metrics (`record_autoscaling_stats`)
describe that replica, not its callers' callers. So the ingress reports here (a
fire-and-forget call every `FLUSH_S`) and the policy reads here, by long poll
(`loads_after`): a report reaches the controller as soon as the board has it, and at
rest the controller asks once every `LONG_POLL_S`. Serve's own controller-to-replica
updates work the same way (`ray.serve._private.long_poll`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from servegraph._actors import NAMESPACE, cluster_actor
from servegraph.deploy.scaling.demand import (
    Arrivals,
    CallMix,
    call_paths,
    prior_calls,
    server_loads,
    servers_called,
)
from servegraph.lang.graph import Graph

ACTOR_NAME = "servegraph-demand"
ACTOR_NAMESPACE = NAMESPACE
# How often an ingress replica reports while requests arrive (an idle one sends nothing):
# a step reaches the board this soon.
FLUSH_S = 0.1
# The longest a `loads_after` waits for a report: a quarter of the watcher's STALE_S, so a
# slow controller still refreshes its snapshot well before it is dropped as stale.
LONG_POLL_S = 0.5

_log = logging.getLogger("ray.serve")


class DemandBoard:
    """Arrivals per pipeline (all ingress replicas together) and each pipeline's calls
    per request; each server's expected load from them. Every method answers at once
    but `loads_after`, a long poll.

    Args:
        clock: seconds (the board's own: reports are timed on arrival here, so ingress
            replicas' clocks never need to agree).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._arrivals: dict[str, Arrivals] = {}
        self._mixes: dict[str, CallMix] = {}
        self.version = 0  # reports taken so far
        self._reported: asyncio.Event | None = None  # made in the actor's event loop

    def report(
        self,
        arrived: Mapping[str, int],
        finished: Mapping[str, tuple[int, dict[str, int]]],
        priors: Mapping[str, dict[str, float]] | None = None,
    ) -> None:
        """From one ingress replica, since its last report: requests `arrived` per
        pipeline (refused ones too: they are demand), per pipeline the requests
        `finished` with the calls they made to each server, and the `priors` of its
        pipelines (calls per request as their graphs say), sent with every report so
        that a restarted board, or a redeployed graph, has them at once."""
        now = self._clock()
        for pipeline, prior in (priors or {}).items():
            mix = self._mixes.get(pipeline)
            if mix is None:
                self._mixes[pipeline] = CallMix(dict(prior))
            elif mix.prior != prior:
                mix.prior = dict(prior)
        for pipeline, n in arrived.items():
            self._arrivals.setdefault(pipeline, Arrivals()).add(n, now)
        for pipeline, (requests, calls) in finished.items():
            self._mixes.setdefault(pipeline, CallMix({})).observe(requests, calls)
        self.version += 1
        if self._reported is not None:
            self._reported.set()

    def loads(self, short_s: float, long_s: float) -> dict[str, tuple[float, float]]:
        """Each server's expected calls per second over the two windows."""
        now = self._clock()
        rates = {p: a.load(short_s, long_s, now) for p, a in self._arrivals.items()}
        mixes = {p: m.per_request() for p, m in self._mixes.items()}
        return {s: (load.short, load.long) for s, load in server_loads(rates, mixes).items()}

    async def loads_after(
        self, seen: int, wait_s: float, windows: list[tuple[float, float]]
    ) -> tuple[int, dict[tuple[float, float], dict[str, tuple[float, float]]]]:
        """A long poll: the board's version and each window pair's `loads`, once a report
        newer than version `seen` came, or after `wait_s` without one. A `seen` other
        than the board's own version (a first call, or a board restarted since) is
        answered at once. (Ray runs an actor's plain methods on its event loop once it
        has an async one, so `report` sets the event from the same thread.)"""
        if seen == self.version:
            if self._reported is None:
                self._reported = asyncio.Event()
            self._reported.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reported.wait(), wait_s)
        return self.version, {(s, lo): self.loads(s, lo) for s, lo in windows}

    def mixes(self) -> dict[str, dict[str, float]]:
        """Each pipeline's calls per request to each server, as now estimated."""
        return {p: m.per_request() for p, m in self._mixes.items()}


def board_actor() -> Any:
    """The cluster's one `DemandBoard` (created by the first caller that needs it)."""
    return cluster_actor(DemandBoard, ACTOR_NAME)


class Reporter:
    """In an ingress replica: counts what arrives and what finished requests called,
    and reports it to the board every `FLUSH_S` (from a task started with the first
    arrival, so the count is never in the request's way).

    Args:
        graphs: the pipelines this ingress runs (each at its default version, whose
            calls are the prior).
        board: a `DemandBoard` actor handle; default: the cluster's, found when first
            needed.
        versions: every version of each pipeline (name -> version -> graph): a
            request's calls are counted whichever version ran it.
    """

    def __init__(
        self,
        graphs: Mapping[str, Graph],
        board: Any = None,
        versions: Mapping[str, Mapping[str, Graph]] | None = None,
    ) -> None:
        self._priors = {name: prior_calls(g) for name, g in graphs.items()}
        self._paths = {name: call_paths(g) for name, g in graphs.items()}
        self._version_paths = {
            (name, version): call_paths(graph)
            for name, served in (versions or {}).items()
            for version, graph in served.items()
        }
        self._board = board
        self._arrived: dict[str, int] = defaultdict(int)
        self._finished: dict[str, tuple[int, dict[str, int]]] = {}
        self._task: asyncio.Task[None] | None = None

    def arrived(self, pipeline: str) -> None:
        self._arrived[pipeline] += 1
        if self._task is None or self._task.done():
            # no loop: a test calling the app synchronously
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._flushing())

    def finished(self, pipeline: str, records: Iterable[Any], version: str = "") -> None:
        """A request of `pipeline` (run by its `version`) ended; `records` are its
        `NodeRecord`s."""
        paths = self._version_paths.get((pipeline, version)) or self._paths.get(pipeline)
        if paths is None:
            return
        made = servers_called(paths, ((r.node, r.kind, r.status) for r in records))
        requests, calls = self._finished.get(pipeline, (0, {}))
        for server, n in made.items():
            calls[server] = calls.get(server, 0) + n
        self._finished[pipeline] = (requests + 1, calls)

    def take(self) -> tuple[dict[str, int], dict[str, tuple[int, dict[str, int]]]]:
        """What to report now, and start counting afresh."""
        arrived, finished = dict(self._arrived), self._finished
        self._arrived.clear()
        self._finished = {}
        return arrived, finished

    async def _flushing(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            arrived, finished = self.take()
            if not arrived and not finished:
                return  # idle: the next arrival starts a new task
            try:
                if self._board is None:  # a GCS call: off the event loop
                    self._board = await asyncio.to_thread(board_actor)
                self._send(arrived, finished)
            except Exception as exc:  # scaling's loss, never a request's
                self._board = None
                _log.warning("demand board unavailable (%s); arrivals not reported", exc)
                await asyncio.sleep(5)  # finding the board again is a GCS call: not often
                # What arrived meanwhile would reach the board as one bucket, a burst
                # twenty times the real rate: dropped (the long window misses 5 s).
                self.take()

    def _send(
        self, arrived: dict[str, int], finished: dict[str, tuple[int, dict[str, int]]]
    ) -> None:
        self._board.report.remote(arrived, finished, self._priors)  # fire and forget
