"""Per-key rate limits as token buckets, shared by every replica.

Why one shared actor rather than each replica limiting alone: a limit divided across
replicas is wrong whenever the proxy spreads one caller's requests unevenly, and changes
with every autoscaling step; one counter keeps "10 requests per second" true however
many ingress replicas run. The price is one small actor call per request of a *limited*
key (keys without limits never make it); if the actor is restarted its buckets start
full again, which errs towards admitting.

Requests: a bucket of `requests_per_s` tokens (at least 1: a one-second burst), refilled
continuously. LLM tokens: a bucket of `tokens_per_min`, refilled continuously. A request
that will use the LLM is admitted while the balance is positive, and reserves the most
it may spend (`reserve`: its prompt's estimate plus its max_tokens) before it runs, which
may take the balance into debt; when it ends, `settle` replaces the reservation with the
tokens it used (a refund, or a further charge for an estimate that fell short). So
requests arriving together see each other's reservations: of many sent at once while
the balance is low, those after the one that took it to zero or below are refused, and
the key overspends by at most that one request's reservation.
"""

from __future__ import annotations

import time
from typing import Any

from servegraph._actors import NAMESPACE, cluster_actor

ACTOR_NAME = "servegraph-limiter"
ACTOR_NAMESPACE = NAMESPACE


class Limiter:
    """The buckets, in one process. Every method answers at once."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._tokens: dict[str, tuple[float, float]] = {}

    def _level(
        self, buckets: dict[str, tuple[float, float]], key: str, rate_per_s: float, size: float
    ) -> float:
        now = self._clock()
        level, at = buckets.get(key, (size, now))
        level = min(size, level + (now - at) * rate_per_s)
        buckets[key] = (level, now)
        return level

    def admit(self, key: str, requests_per_s: float | None, tokens_per_min: int | None) -> float:
        """0 when admitted (one request taken), else the seconds until it would be."""
        if tokens_per_min is not None:
            rate = tokens_per_min / 60
            level = self._level(self._tokens, key, rate, tokens_per_min)
            if level <= 0:
                return (1 - level) / rate
        if requests_per_s is not None:
            size = max(1.0, requests_per_s)
            level = self._level(self._requests, key, requests_per_s, size)
            if level < 1:
                return (1 - level) / requests_per_s
            self._requests[key] = (level - 1, self._requests[key][1])
        return 0.0

    def reserve(self, key: str, tokens: int, tokens_per_min: int) -> float:
        """Set `tokens` aside for a request about to use the LLM: 0 when taken (the
        balance was positive; it may go into debt by them), else the seconds until the
        balance is positive again (nothing taken). Checked and taken in one step, so
        of requests reserving at once only those that find a positive balance pass."""
        rate = tokens_per_min / 60
        level = self._level(self._tokens, key, rate, tokens_per_min)
        if level <= 0:
            return (1 - level) / rate
        self._tokens[key] = (level - max(tokens, 0), self._tokens[key][1])
        return 0.0

    def settle(self, key: str, reserved: int, used: int, tokens_per_min: int) -> float:
        """A request ended: the `used` tokens replace its `reserved` ones (the balance
        gets back what was set aside and not used, or pays what was used beyond it; it
        never fills past the bucket); the balance left."""
        level = self._level(self._tokens, key, tokens_per_min / 60, tokens_per_min)
        level = min(float(tokens_per_min), level + reserved - used)
        self._tokens[key] = (level, self._tokens[key][1])
        return level

    def spend(self, key: str, tokens: int, tokens_per_min: int) -> float:
        """Charge LLM tokens used without a reservation; the balance left."""
        return self.settle(key, 0, tokens, tokens_per_min)

    def balance(self, key: str, tokens_per_min: int) -> float:
        """The key's LLM tokens left now (below zero: its debt)."""
        return self._level(self._tokens, key, tokens_per_min / 60, tokens_per_min)


def shared_limiter() -> Any:
    """The cluster's one `Limiter`, as a detached actor (created by the first replica
    that needs it). Its methods return ObjectRefs, which the caller awaits."""
    actor: Any = cluster_actor(Limiter, ACTOR_NAME)

    class Remote:
        def admit(self, *args: Any) -> Any:
            return actor.admit.remote(*args)

        def spend(self, *args: Any) -> Any:
            return actor.spend.remote(*args)

        def reserve(self, *args: Any) -> Any:
            return actor.reserve.remote(*args)

        def settle(self, *args: Any) -> Any:
            return actor.settle.remote(*args)

        def balance(self, *args: Any) -> Any:
            return actor.balance.remote(*args)

    return Remote()
