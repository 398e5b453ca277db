"""The LLM engine ends a pipeline call's reply when the call's charge reaches its
allowance (what its request's budget had left), and says so in the charge item: the
`LLMServer` subclass's meter, on a fake stream and a clock, without an engine."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from deployments.llm.client import STOPPED
from deployments.llm.engine import LLMServer
from servegraph.cost.metering import CHARGE_ITEM, Meter
from servegraph.cost.prices import prices


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def items(clock: Clock, closed: list[bool]) -> AsyncIterator[str]:
    """Ten stream items, one second of the replica apart."""
    try:
        for i in range(10):
            clock.now += 1.0
            yield f"data: {i}"
    finally:
        closed.append(True)


async def run(allowance_usd: float | None, raw_request_info: object = None) -> list[object]:
    clock, closed = Clock(), []
    replica = SimpleNamespace(_meter=Meter({"cpu": 1.0, "gpu": 0.0, "gib": 0.0}, clock=clock))
    stream = LLMServer._metered(replica, items(clock, closed), raw_request_info, allowance_usd)
    got = [item async for item in stream]
    assert closed == [True]  # stopped or not, the engine's stream is closed
    return got


async def test_the_reply_stops_when_its_charge_reaches_the_allowance() -> None:
    per_second = prices().usd({"cpu_s": 1.0})
    got = await run(allowance_usd=3.5 * per_second)
    assert got[:-1] == ["data: 0", "data: 1", "data: 2", "data: 3"]  # 4 s >= 3.5 s
    assert got[-1][STOPPED] == "budget"
    assert got[-1][CHARGE_ITEM]["cpu_s"] == pytest.approx(4.0)


async def test_without_an_allowance_or_within_it_the_reply_runs_to_its_end() -> None:
    for allowance_usd in (None, 1.0):
        got = await run(allowance_usd)
        assert len(got) == 11 and STOPPED not in got[-1]
    # An OpenAI route's call (raw request info): no charge item at all.
    assert len(await run(None, raw_request_info=object())) == 10


@pytest.mark.parametrize(("allowance_usd", "sent"), [(-1.0, 1), (math.nan, 1), (math.inf, 10)])
async def test_an_allowance_of_less_than_nothing_or_not_a_number_allows_nothing(
    allowance_usd: float, sent: int
) -> None:
    """The engine's own check, whatever it is sent: below zero or NaN (NaN compares
    false, so it never stopped) ends the reply after its first item; infinity never."""
    got = await run(allowance_usd)
    assert len(got) == sent + 1
    assert (STOPPED in got[-1]) == (sent < 10)
