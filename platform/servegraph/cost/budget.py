"""A request's maximum cost (`Budget`), the recent cost of each method it is checked
against (`CostModel`, `Estimate`), and the allowance a running call may spend
(`allowance`)."""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_allowance: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "servegraph_call_allowance_usd", default=None
)


def allowance() -> float | None:
    """The most the running model-server call may cost (USD), when its request has a
    budget: what the budget had left when the call started. Set by the runtime around
    each call; a server's client that can stop its work part-way passes it on. Always
    a number >= 0, or None (`bounded_allowance`)."""
    return bounded_allowance(_allowance.get())


@contextmanager
def allowing(usd: float | None) -> Iterator[None]:
    """Within the block, `allowance()` is `usd` (bounded): the runtime sets it around
    each model-server call of a request with a budget."""
    token = _allowance.set(bounded_allowance(usd))
    try:
        yield
    finally:
        _allowance.reset(token)


def bounded_allowance(usd: float | None) -> float | None:
    """What is left of a budget as a call's allowance: `usd` when it is a number >= 0;
    0 for less, or for NaN (a budget that is not a number allows nothing); None, no
    limit, for no budget or an infinite one (a maximum beyond any cost)."""
    if usd is None or usd == math.inf:
        return None
    return usd if usd >= 0 else 0.0  # NaN compares false: 0


@dataclass(frozen=True)
class Estimate:
    """A method's expected cost in USD: `per_call`, plus `per_token` for each output
    token (zero for a method without token usage)."""

    per_call: float
    per_token: float = 0.0

    def at(self, tokens: int = 0) -> float:
        return self.per_call + self.per_token * tokens


class CostModel:
    """What each model-server method has cost lately, per call (and per output token
    where it reports token usage): the estimates a `Budget` is checked against.

    The last `window` charges of each method, each weighing half as much as the one
    `half_life` calls after it: a call's cost follows the load of the moment (on a
    shared machine an encoder's batch takes longer while the LLM decodes; an LLM
    token costs a request less the more sequences share the decode step), so the
    estimate follows the recent calls. The weighted mean per call, or for a method with
    tokens a weighted least-squares line through (output tokens, cost). Where that line
    has no slope or would go negative (or the token counts have no spread), the mean
    cost per token instead, with nothing per call: that overestimates short replies,
    the safe side for a budget.
    """

    def __init__(self, window: int = 64, half_life: float = 4.0) -> None:
        self.window = window
        self.half_life = half_life
        self._seen: dict[tuple[str, str], deque[tuple[int, float]]] = {}
        self._first: dict[tuple[str, str], asyncio.Event] = {}  # the first calls in flight

    def observe(self, server: str, method: str, usd: float, tokens: int | None = None) -> None:
        if not math.isfinite(usd):  # a charge that is not a number teaches nothing
            return
        seen = self._seen.setdefault((server, method), deque(maxlen=self.window))
        seen.append((tokens if tokens is not None else -1, usd))

    async def first_charge(self, server: str, method: str) -> Estimate | None:
        """The estimate for a method never charged yet: None for the first caller, whose
        call runs to learn it (it must call `settled` when it ends); later callers wait
        for that call to end, then get the estimate (None still, if it failed)."""
        key = (server, method)
        running = self._first.get(key)
        if running is None:
            self._first[key] = asyncio.Event()
            return None
        await running.wait()
        return self.estimate(server, method)

    def settled(self, server: str, method: str) -> None:
        """A call ended (its charge observed, if it came back): release the callers
        waiting on the method's first charge."""
        running = self._first.pop((server, method), None)
        if running is not None:
            running.set()

    def estimate(self, server: str, method: str) -> Estimate | None:
        seen = self._seen.get((server, method))
        if not seen:
            return None
        n = len(seen)
        weights = [0.5 ** ((n - 1 - i) / self.half_life) for i in range(n)]
        total_weight = sum(weights)

        def mean(values: Iterable[float]) -> float:
            return sum(w * v for w, v in zip(weights, values, strict=True)) / total_weight

        mean_usd = mean(usd for _, usd in seen)
        if any(tokens < 0 for tokens, _ in seen):
            return Estimate(mean_usd)
        mean_tokens = mean(tokens for tokens, _ in seen)
        if mean_tokens <= 0:
            return Estimate(mean_usd)
        spread = mean((tokens - mean_tokens) ** 2 for tokens, _ in seen)
        if spread > 0:
            slope = mean((t - mean_tokens) * (usd - mean_usd) for t, usd in seen) / spread
            intercept = mean_usd - slope * mean_tokens
            if slope > 0 and intercept >= 0:
                return Estimate(intercept, slope)
        return Estimate(0.0, mean_usd / mean_tokens)


@dataclass
class Budget:
    """A request's maximum cost (USD), what its finished calls have spent, and what its
    running calls have set aside (their estimates), so that parallel branches share
    one budget. `capped` records each node whose output tokens were lowered to fit:
    node -> {field: value}."""

    max_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    capped: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def left_usd(self) -> float:
        return self.max_usd - self.spent_usd - self.reserved_usd

    def report(self) -> dict[str, Any]:
        """The budget's part of a request's usage."""
        return {"max_usd": self.max_usd, "capped": self.capped}
