"""Counters coalesced in the replica (`servegraph.telemetry.metrics.Coalesced`): increments of one
series are summed and reach Ray's counter as one `inc` within `every_s` of the first,
every series apart; with no event loop to wait on, at once. No Ray: the counters here
record what they are given, as the subject is the summing, not Ray's export."""

from __future__ import annotations

from typing import Any

from benchmarks.traffic import until
from servegraph.telemetry.metrics import Coalesced


class Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str] | None]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, tags))


async def test_increments_are_summed_per_series_and_handed_on_once() -> None:
    coalesced = Coalesced(every_s=0.05)
    requests, tokens = Counter(), Counter()
    counted, summed = coalesced.counter(requests), coalesced.counter(tokens)
    for n in range(100):
        counted.inc(tags={"key": "a", "status": "200" if n % 4 else "429"})
        summed.inc(3.5, tags={"key": "a", "direction": "output"})
    counted.inc(tags={"status": "200", "key": "b"})
    assert requests.calls == [] and tokens.calls == []  # nothing per request
    await until(lambda: requests.calls and tokens.calls, 10, "the flush")
    assert sorted(requests.calls, key=repr) == sorted(
        [
            (75.0, {"key": "a", "status": "200"}),
            (25.0, {"key": "a", "status": "429"}),
            (1.0, {"key": "b", "status": "200"}),
        ],
        key=repr,
    )
    assert tokens.calls == [(350.0, {"direction": "output", "key": "a"})]
    counted.inc(tags={"key": "a", "status": "200"})  # the next second's series start anew
    await until(lambda: len(requests.calls) == 4, 10, "the next flush")
    assert requests.calls[-1] == (1.0, {"key": "a", "status": "200"})


def test_without_an_event_loop_each_increment_is_handed_on_at_once() -> None:
    counter = Counter()
    coalesced: Any = Coalesced().counter(counter)
    coalesced.inc(2.0, tags={"pipeline": "rag"})
    coalesced.inc()
    assert counter.calls == [(2.0, {"pipeline": "rag"}), (1.0, None)]


class Refusing(Counter):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        raise ValueError("a tag Ray rejects")


async def test_a_refused_series_costs_no_other_and_nothing_is_zero() -> None:
    coalesced = Coalesced(every_s=0.01)
    good, bad = Counter(), Refusing()
    coalesced.counter(bad).inc(tags={"x": "y"})
    coalesced.counter(good).inc(0.0)  # Ray's counters refuse a zero: never handed on
    coalesced.counter(good).inc(float("nan"))
    coalesced.counter(good).inc(2.0)
    await until(lambda: good.calls, 10, "the flush")
    assert good.calls == [(2.0, None)]
