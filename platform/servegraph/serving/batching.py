"""Dynamic batching for model servers: single items from many concurrent callers become
one forward pass, and a batch is formed when the model is free to run it.

Why not `@serve.batch`: in Ray Serve 2.60 its queue forms each batch as soon as the first
item has waited `batch_wait_timeout_s`, *before* the `max_concurrent_batches` semaphore is
free (``_BatchQueue._process_batches`` creates a task per formed batch, and the task then
waits for the semaphore). While one batch runs on the model, the arrivals of every 5 ms
are cut into further small batches that queue behind it. Under 64 concurrent callers that
measured 523 batches of size 1 for 704 items and 21 items/s on the embedder (see issue 10's
closing note). Here the single worker takes everything queued (up to `max_batch_size`)
only once the previous batch has finished, so a busy model always gets a full batch and an
idle one waits at most `wait_s` for company.

What Serve's batching also did, kept here: per-batch size and queue-wait metrics (a Serve
metric and `stats()`), cancelled requests are skipped, an exception fails the batch's
requests only. Each request's span records the largest batch it rode in and its wait, and
so does its response (`servegraph.cost.metering.note`: a node record's `call`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

from servegraph.cost.metering import note
from servegraph.telemetry.metrics import batch_size_histogram, batch_wait_histogram
from servegraph.telemetry.tracing import annotate

T = TypeVar("T")
R = TypeVar("R")


class BatchStats(BaseModel):
    """What dynamic batching did so far in this replica."""

    batches: int
    items: int
    max_batch_size: int
    histogram: dict[int, int] = Field(description="batch size -> number of batches")
    run_s: float = Field(
        0.0,
        description="Seconds the model's batch function ran, all batches together: over a "
        "window, its share of the window is the model's duty cycle (the rest is the model "
        "waiting for items), and items over it the forward pass's own speed.",
    )

    def median_since(self, before: BatchStats) -> tuple[int, int]:
        """The median batch size of the batches formed since `before`: per batch, and
        the batch the median item rode in (batches weighted by their items)."""
        counts = {
            size: n - before.histogram.get(size, 0)
            for size, n in self.histogram.items()
            if n > before.histogram.get(size, 0)
        }
        if not counts:
            raise ValueError("no batch was formed since `before`")
        per_batch = sorted(size for size, n in counts.items() for _ in range(n))
        per_item = sorted(size for size, n in counts.items() for _ in range(size * n))
        return per_batch[len(per_batch) // 2], per_item[len(per_item) // 2]


@dataclass
class _Item(Generic[T, R]):
    payload: T
    future: asyncio.Future[tuple[R, int, float]]
    queued_at: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Feeds `run` (a list of payloads -> a list of results, in order) with batches.

    Args:
        run: the model's batch function; it should not block the event loop (run the
            forward pass in a thread) so that items keep queueing while it works.
        max_batch_size: the most items one call of `run` gets.
        wait_s: how long the oldest queued item waits for company when the model is
            idle. A busy model never waits: what queued meanwhile is the next batch.
        name: the model server, as the batch-size metric's `server` tag.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int = 64,
        wait_s: float = 0.005,
        name: str = "model",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: deque[_Item[T, R]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._sizes: Counter[int] = Counter()
        self._run_s = 0.0
        self._histogram = batch_size_histogram(name)
        self._waits = batch_wait_histogram(name)

    async def submit(self, payloads: Sequence[T]) -> list[R]:
        """Each payload's result, in order. A request with more payloads than
        `max_batch_size` is spread over several batches (shared with other callers')."""
        loop = asyncio.get_running_loop()
        items = [_Item[T, R](p, loop.create_future()) for p in payloads]
        self._queue.extend(items)
        self._wake(loop)
        try:
            results = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            for item in items:  # what has not run yet is skipped by the worker
                item.future.cancel()
            raise
        size, wait_ms = max(r[1] for r in results), max(r[2] for r in results)
        annotate(**{"servegraph.batch.size": size, "servegraph.batch.queue_wait_ms": wait_ms})
        note(batch_size=size, queue_wait_ms=wait_ms)  # back with the response, for waterfalls
        return [r[0] for r in results]

    async def one(self, payload: T) -> R:
        (result,) = await self.submit([payload])
        return result

    def stats(self) -> BatchStats:
        return BatchStats(
            batches=sum(self._sizes.values()),
            items=sum(size * n for size, n in self._sizes.items()),
            max_batch_size=max(self._sizes, default=0),
            histogram=dict(sorted(self._sizes.items())),
            run_s=self._run_s,
        )

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="servegraph-batcher")

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # The model is free. Give the oldest item until its wait is up to be joined
            # (unless a full batch is already here).
            until = self._queue[0].queued_at + self.wait_s
            while len(self._queue) < self.max_batch_size:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._execute(batch)

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _take(self) -> list[_Item[T, R]]:
        batch: list[_Item[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    async def _execute(self, batch: list[_Item[T, R]]) -> None:
        started = time.monotonic()
        self._record(len(batch))
        try:
            try:
                results = list(await self._run([item.payload for item in batch]))
            finally:
                self._run_s += time.monotonic() - started
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(batch)} items"
                )
        except Exception as exc:  # the batch's requests fail; the worker goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                wait_ms = round((started - item.queued_at) * 1000, 3)
                item.future.set_result((result, len(batch), wait_ms))
                if self._waits is not None:
                    self._waits.observe(wait_ms)

    def _record(self, size: int) -> None:
        self._sizes[size] += 1
        if self._histogram is not None:
            self._histogram.observe(size)
