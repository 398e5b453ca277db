"""What a request costs (`servegraph.cost`): the sharing arithmetic on recorded timings,
prices and energy, the charge's trip with the response, and the usage's totals."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from pydantic import BaseModel

from servegraph.cost.metering import Meter, attach, charge_of, metered, total
from servegraph.cost.prices import Prices
from servegraph.engine.runtime import NodeRecord
from servegraph.serving.ingress import usage_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def meter(**resources: float) -> tuple[Meter, Clock]:
    clock = Clock()
    return Meter({"cpu": 0.0, "gpu": 0.0, "gib": 0.0} | resources, clock=clock), clock


def test_a_request_alone_is_charged_the_replica_for_its_whole_time() -> None:
    m, clock = meter(cpu=2.0, gpu=0.1)
    ticket = m.start()
    clock.now = 3.0
    assert m.stop(ticket) == pytest.approx({"cpu_s": 6.0, "gpu_s": 0.3, "gib_s": 0.0})


def test_requests_served_at_once_share_the_time_and_the_shares_add_up() -> None:
    # A from 0 to 4 s, B from 2 to 4 s, C from 5 to 6 s: A holds the replica alone for
    # 2 s, then shares 2 s with B; nothing runs from 4 to 5 s (charged to nobody).
    m, clock = meter(cpu=1.0)
    a = m.start()
    clock.now = 2.0
    b = m.start()
    clock.now = 4.0
    charge_b, charge_a = m.stop(b), m.stop(a)
    clock.now = 5.0
    c = m.start()
    clock.now = 6.0
    charge_c = m.stop(c)
    assert charge_a["cpu_s"] == pytest.approx(3.0) and charge_b["cpu_s"] == pytest.approx(1.0)
    assert charge_c["cpu_s"] == pytest.approx(1.0)
    assert total([charge_a, charge_b, charge_c])["cpu_s"] == pytest.approx(m.busy_s) == 5.0


def test_two_requests_with_equal_values_are_still_two() -> None:
    m, clock = meter(gpu=0.6)
    a, b = m.start(), m.start()  # the same start, the same accrual so far
    clock.now = 2.0
    assert m.stop(b)["gpu_s"] == pytest.approx(0.6)
    clock.now = 4.0
    assert m.stop(a)["gpu_s"] == pytest.approx(0.6 + 1.2)


def test_prices_and_energy_come_from_the_tables() -> None:
    prices = Prices(usd_per_cpu_hour=0.036, usd_per_gpu_hour=0.9, watts_per_cpu=4, pue=1.0)
    charge = {"cpu_s": 3600.0, "gpu_s": 1800.0, "gib_s": 0.0}
    assert prices.usd(charge) == pytest.approx(0.036 + 0.45)
    assert prices.joules(charge) == pytest.approx(3600 * 4 + 1800 * 150)


class Answer(BaseModel):
    text: str


def test_the_charge_travels_with_the_response_and_stays_out_of_its_json() -> None:
    answer = attach(Answer(text="hi"), {"cpu_s": 1.5})
    copied = pickle.loads(pickle.dumps(answer))  # as Ray carries it between processes
    assert charge_of(copied) == {"cpu_s": 1.5}
    assert copied.model_dump() == {"text": "hi"} and copied.model_dump_json() == '{"text":"hi"}'


def test_metered_methods_charge_each_call_concurrent_calls_sharing() -> None:
    class Server:
        def __init__(self) -> None:
            self.gate = asyncio.Event()

        async def slow(self, text: str) -> Answer:
            await self.gate.wait()
            return Answer(text=text)

        def quick(self, text: str) -> Answer:
            return Answer(text=text)

    Metered = metered(["slow", "quick"])(Server)
    server = Metered()
    m, clock = meter(cpu=2.0)
    server.__dict__["_servegraph_meter"] = m  # in a replica: Ray's assigned resources

    async def two_at_once() -> list[Answer]:
        calls = [asyncio.ensure_future(server.slow(t)) for t in ("a", "b")]
        await asyncio.sleep(0)
        clock.now = 1.0
        server.gate.set()
        return await asyncio.gather(*calls)

    answers = asyncio.run(two_at_once())
    assert [charge_of(a)["cpu_s"] for a in answers] == pytest.approx([1.0, 1.0])
    assert charge_of(server.quick("c"))["cpu_s"] == 0.0  # no time passed on the clock
    # The replica's busy time is what its charges add up to, per CPU.
    assert server.meter_stats() == {"busy_s": 1.0, "resources": m.resources}


def test_the_usage_total_is_the_sum_of_its_nodes() -> None:
    records = [
        NodeRecord("embed", "call", 1, "ok", 12.0, charge={"cpu_s": 0.02}),
        NodeRecord("retrieve", "call", 1, "ok", 3.0, charge={"cpu_s": 0.001}),
        NodeRecord("generate", "call", 1, "error", 900.0, charge={"gpu_s": 0.4}),
        NodeRecord("generate", "call", 2, "ok", 1500.0, charge={"gpu_s": 0.9, "cpu_s": 1.5}),
        NodeRecord("prompt", "function", 1, "ok", 0.1),
    ]
    usage = usage_of(records, 2500.0)
    assert usage["nodes_usd"].keys() == {"embed", "retrieve", "generate"}  # retries summed
    assert usage["usd"] == pytest.approx(sum(usage["nodes_usd"].values()), abs=1e-8)
    assert usage["resource_s"]["gpu_s"] == pytest.approx(1.3)
    assert usage["joules"] > 0


def test_a_short_gap_between_calls_is_serving_work_and_a_long_one_is_idle() -> None:
    m, clock = meter(cpu=1.0)
    first = m.start()
    clock.now = 1.0
    m.stop(first)
    clock.now = 1.002  # Serve received and dispatched the next request meanwhile
    second = m.start()
    clock.now = 2.0
    assert m.stop(second)["cpu_s"] == pytest.approx(1.0)
    clock.now = 5.0  # three idle seconds: nobody's
    third = m.start()
    clock.now = 5.5
    assert m.stop(third)["cpu_s"] == pytest.approx(0.5)
    assert m.busy_s == pytest.approx(2.5)
