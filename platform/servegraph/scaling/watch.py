"""The demand board's latest loads, kept fresh in the process that asks (Serve's
controller) by a daemon thread, so a policy reads them without waiting on an actor.

A module of its own because Serve pickles the policy's module by value to ship it to
the controller, and this module's state (a lock, a thread) cannot be pickled: the
policy refers to it by import path instead.
"""

from __future__ import annotations

import logging
import threading
import time

from servegraph.scaling.demand import Load

POLL_S = 0.2

_log = logging.getLogger("ray.serve")


class _Watcher:
    """The board's latest loads for each (short, long) window pair asked for, kept
    fresh by a daemon thread (one per process: the controller's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: set[tuple[float, float]] = set()
        self._loads: dict[tuple[float, float], dict[str, tuple[float, float]]] = {}
        self._thread: threading.Thread | None = None

    def load(self, server: str, short_s: float, long_s: float) -> Load:
        with self._lock:
            self._windows.add((short_s, long_s))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._poll, name="servegraph-demand", daemon=True
                )
                self._thread.start()
            short, long = self._loads.get((short_s, long_s), {}).get(server, (0.0, 0.0))
        return Load(short, long)

    def _poll(self) -> None:
        import ray

        from servegraph.scaling.board import ACTOR_NAME, ACTOR_NAMESPACE

        board = None
        while True:
            try:
                if board is None:
                    board = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
                with self._lock:
                    windows = list(self._windows)
                refs = [board.loads.remote(s, lo) for s, lo in windows]
                answers: list[dict[str, tuple[float, float]]] = ray.get(refs, timeout=5)
                fresh = dict(zip(windows, answers, strict=True))
                with self._lock:
                    self._loads = fresh
            except ValueError:
                pass  # no board yet: no ingress has reported
            except Exception as exc:
                board = None
                _log.warning("demand board unavailable (%s)", type(exc).__name__)
            time.sleep(POLL_S)


_WATCHER = _Watcher()


def shared() -> _Watcher:
    """This process's watcher."""
    return _WATCHER
