"""The dynamic batcher every model server uses (`servegraph.serving.batching`), without Ray or a
model: a batch function that records what it was given. Many concurrent callers, as in
serving: the point is what batches they form."""

from __future__ import annotations

import asyncio

import pytest

from servegraph.serving.batching import Batcher, BatchStats

pytestmark = pytest.mark.unit


class Model:
    """Doubles numbers; each batch holds the model until `release` is set (when given)."""

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = release
        self.running = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.running.set()
        if self.release is not None:
            await self.release.wait()
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [i * 2 for i in items]


async def test_results_come_back_in_order_for_each_caller() -> None:
    batcher = Batcher(Model(), max_batch_size=4, wait_s=0.001)
    results = await asyncio.gather(*(batcher.submit([n, n + 100]) for n in range(20)))
    assert results == [[2 * n, 2 * (n + 100)] for n in range(20)]


async def test_callers_arriving_while_the_model_is_busy_form_one_full_batch() -> None:
    release = asyncio.Event()
    model = Model(release)
    batcher = Batcher(model, max_batch_size=64, wait_s=0.0)
    first = asyncio.create_task(batcher.one(0))
    await model.running.wait()  # the model is busy with a batch of one
    rest = [asyncio.create_task(batcher.one(n)) for n in range(1, 65)]
    await asyncio.sleep(0)  # let every caller queue its item
    release.set()
    assert await first == 0 and [await r for r in rest] == [2 * n for n in range(1, 65)]
    # No batch was cut while the model was busy: the 64 waiting callers rode in one.
    assert [len(b) for b in model.batches] == [1, 64]
    stats = batcher.stats()
    assert stats.histogram == {1: 1, 64: 1} and stats.items == 65


async def test_a_request_larger_than_a_batch_is_fed_max_batch_size_at_a_time() -> None:
    model = Model()
    batcher = Batcher(model, max_batch_size=16, wait_s=0.0)
    assert await batcher.submit(list(range(100))) == [2 * n for n in range(100)]
    assert [len(b) for b in model.batches] == [16] * 6 + [4]


async def test_a_failing_batch_fails_its_own_callers_only() -> None:
    release = asyncio.Event()
    model = Model(release)
    batcher = Batcher(model, max_batch_size=2, wait_s=0.0)
    bad = asyncio.create_task(batcher.submit([1, -1]))
    await model.running.wait()
    good = asyncio.create_task(batcher.submit([3, 4]))
    release.set()
    with pytest.raises(ValueError, match="negative"):
        await bad
    assert await good == [6, 8]


async def test_a_cancelled_caller_is_not_run() -> None:
    release = asyncio.Event()
    model = Model(release)
    batcher = Batcher(model, max_batch_size=8, wait_s=0.0)
    first = asyncio.create_task(batcher.one(1))
    await model.running.wait()
    abandoned = asyncio.create_task(batcher.one(2))
    kept = asyncio.create_task(batcher.one(3))
    await asyncio.sleep(0)
    abandoned.cancel()
    release.set()
    assert await first == 2 and await kept == 6
    assert model.batches == [[1], [3]]


async def test_an_idle_model_waits_for_company_only_up_to_wait_s() -> None:
    model = Model()
    batcher = Batcher(model, max_batch_size=8, wait_s=0.05)
    # Items queued within the wait ride together; the wait ends by itself (no full batch).
    results = await asyncio.gather(batcher.one(1), batcher.one(2), batcher.one(3))
    assert results == [2, 4, 6] and model.batches == [[1, 2, 3]]


def test_median_batch_since_a_snapshot_counts_only_new_batches() -> None:
    before = BatchStats(batches=2, items=2, max_batch_size=1, histogram={1: 2})
    after = BatchStats(
        batches=6, items=2 + 1 + 2 * 30, max_batch_size=30, histogram={1: 3, 2: 1, 30: 2}
    )
    # new batches: 1, 2, 30, 30 -> per batch the median is 30 (index 2 of 4); the median
    # of the 63 new items rode in a batch of 30
    assert after.median_since(before) == (30, 30)
    with pytest.raises(ValueError):
        before.median_since(before)


async def test_run_s_counts_the_seconds_the_model_ran_failed_batches_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`BatchStats.run_s` is the model's busy time (its duty cycle over a window): every
    batch's run, a failing one included, and none of the waits between them."""
    from servegraph.serving import batching

    class Clock:  # the batcher's clock; each batch takes 0.25 s of it
        now = batching.time.monotonic()

        @classmethod
        def monotonic(cls) -> float:
            return cls.now

    monkeypatch.setattr(batching, "time", Clock)

    class Slow(Model):
        async def __call__(self, items: list[int]) -> list[int]:
            Clock.now += 0.25
            return await super().__call__(items)

    batcher = Batcher(Slow(), max_batch_size=4, wait_s=0.0)
    assert await batcher.one(1) == 2
    with pytest.raises(ValueError):
        await batcher.one(-1)
    Clock.now += 10.0  # idle: not the model's time
    assert await batcher.submit([1, 2]) == [2, 4]
    assert batcher.stats().run_s == pytest.approx(0.75)
