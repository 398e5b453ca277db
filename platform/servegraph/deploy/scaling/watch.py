"""The demand board's latest loads, kept fresh in the process that asks (Serve's
controller) by a daemon thread, so a policy reads them without waiting on an actor.
The thread long-polls the board (`DemandBoard.loads_after`): each report the board takes
reaches it within an actor call's time, and an idle board is asked twice a second.

A module of its own because Serve pickles the policy's module by value to ship it to
the controller, and this module's state (a lock, a thread) cannot be pickled: the
policy refers to it by import path instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from servegraph.deploy.scaling.demand import Load

# The least time between two reads of the board: while reports stream in (every
# `FLUSH_S` from each ingress replica) the thread reads at most this often.
MIN_GAP_S = 0.05
# A snapshot older than this is not used: with the board gone (or a call hanging) the
# prediction is nothing, and Serve's own rule in the policy carries on alone, rather
# than a spike's loads holding replicas for ever.
STALE_S = 2.0
# Every server's policy in one control-loop tick (0.25 s apart here,
# `servegraph.deploy.local_ray.RAY_AT_REST_ENV`; the calls of one tick within milliseconds)
# reads the same snapshot, even if a fresher one arrives between two of them: so the
# servers a step concerns grow in the same decision.
TICK_S = 0.05
WARN_EVERY_S = 60.0

_log = logging.getLogger("ray.serve")


class _Watcher:
    """The board's latest loads for each (short, long) window pair asked for, kept
    fresh by a daemon thread (one per process: the controller's), restarted if it ever
    ends."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: set[tuple[float, float]] = set()
        self._loads: dict[tuple[float, float], dict[str, tuple[float, float]]] = {}
        self._at = -math.inf  # when `_loads` was fetched
        self._thread: threading.Thread | None = None
        self._warned = -math.inf
        self._read: tuple[dict[tuple[float, float], dict[str, tuple[float, float]]], float]
        self._read, self._read_at = ({}, -math.inf), -math.inf

    def load(self, server: str, short_s: float, long_s: float) -> Load:
        with self._lock:
            self._windows.add((short_s, long_s))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._poll, name="servegraph-demand", daemon=True
                )
                self._thread.start()
            now = self._clock()
            if now - self._read_at > TICK_S:  # the first read of a control-loop tick
                self._read, self._read_at = (self._loads, self._at), now
            loads, at = self._read
            if now - at > STALE_S:
                return Load()
            short, long = loads.get((short_s, long_s), {}).get(server, (0.0, 0.0))
        return Load(short, long)

    def publish(self, loads: dict[tuple[float, float], dict[str, tuple[float, float]]]) -> None:
        with self._lock:
            self._loads, self._at = loads, self._clock()

    def _poll(self) -> None:
        import ray

        from servegraph.deploy.scaling.board import ACTOR_NAME, ACTOR_NAMESPACE, LONG_POLL_S

        board: Any = None
        seen = -1
        while True:
            try:
                if board is None:
                    try:
                        board = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
                    except ValueError:  # no board yet: no ingress has reported
                        time.sleep(LONG_POLL_S)
                        continue
                with self._lock:  # a pair asked for during a poll waits for the next one
                    windows = list(self._windows)
                ref = board.loads_after.remote(seen, LONG_POLL_S, windows)
                seen, loads = ray.get(ref, timeout=LONG_POLL_S + 5)
                self.publish(loads)
                time.sleep(MIN_GAP_S)
            except Exception as exc:
                board, seen = None, -1
                if self._clock() - self._warned > WARN_EVERY_S:
                    self._warned = self._clock()
                    hint = (
                        ": a board started by an older servegraph (no loads_after) outlives "
                        "a redeploy; restart Ray or ray.kill the 'servegraph-demand' actor"
                        if isinstance(exc, AttributeError)
                        else ""
                    )
                    _log.warning("demand board unavailable (%s)%s", type(exc).__name__, hint)
                time.sleep(LONG_POLL_S)


_WATCHER = _Watcher()


def shared() -> _Watcher:
    """This process's watcher."""
    return _WATCHER
