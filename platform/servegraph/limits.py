"""Per-key rate limits as token buckets, shared by every replica.

Why one shared actor rather than each replica limiting alone: a limit divided across
replicas is wrong whenever the proxy spreads one caller's requests unevenly, and changes
with every autoscaling step; one counter keeps "10 requests per second" true however
many ingress replicas run. The price is one small actor call per request of a *limited*
key (keys without limits never make it); if the actor is restarted its buckets start
full again, which errs towards admitting.

Requests: a bucket of `requests_per_s` tokens (at least 1: a one-second burst), refilled
continuously. LLM tokens: a bucket of `tokens_per_min`, refilled continuously, charged
after each answer with the tokens it used (it may go into debt: a request's size is
known only once answered); a request that will use the LLM is admitted while the balance
is positive.
"""

from __future__ import annotations

import time
from typing import Any

ACTOR_NAME = "servegraph-limiter"
ACTOR_NAMESPACE = "servegraph"


class Limiter:
    """The buckets, in one process. `admit` and `spend` answer at once."""

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

    def spend(self, key: str, tokens: int, tokens_per_min: int) -> float:
        """Charge LLM tokens used; the balance left."""
        level = self._level(self._tokens, key, tokens_per_min / 60, tokens_per_min) - tokens
        self._tokens[key] = (level, self._tokens[key][1])
        return level


def shared_limiter() -> Any:
    """The cluster's one `Limiter`, as a detached actor (created by the first replica
    that needs it). Its methods return ObjectRefs, which the caller awaits."""
    import ray

    actor: Any = (
        ray.remote(Limiter)
        .options(
            name=ACTOR_NAME,
            namespace=ACTOR_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
        )
        .remote()
    )

    class Remote:
        def admit(self, *args: Any) -> Any:
            return actor.admit.remote(*args)

        def spend(self, *args: Any) -> Any:
            return actor.spend.remote(*args)

    return Remote()
