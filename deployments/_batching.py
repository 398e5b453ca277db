"""Counting what @serve.batch actually did, so tests, benchmarks and dashboards see it.

Each batched item carries the time it was queued, and each result carries the batch
size and that wait back to its request, whose span records them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.schemas import BatchStats
from servegraph.metrics import batch_size_histogram
from servegraph.tracing import annotate


class BatchRecorder:
    """Counts batch sizes for `/stats`, and exports them as a Serve metric."""

    def __init__(self, server: str) -> None:
        self._sizes: Counter[int] = Counter()
        self._histogram = batch_size_histogram(server)

    def begin(self, items: list[tuple[Any, float]]) -> tuple[list[Any], float]:
        """Inside a batch: count it; return the payloads and when the batch started."""
        self.record(len(items))
        return [payload for payload, _ in items], time.monotonic()

    @staticmethod
    def finish(results: list[Any], items: list[tuple[Any, float]], started: float) -> list[tuple]:
        """Each result with the batch size and how long its item queued."""
        return [
            (result, len(items), round((started - queued_at) * 1000, 3))
            for result, (_, queued_at) in zip(results, items, strict=True)
        ]

    def record(self, size: int) -> None:
        self._sizes[size] += 1
        if self._histogram is not None:
            self._histogram.observe(size)

    def stats(self) -> BatchStats:
        return BatchStats(
            batches=sum(self._sizes.values()),
            items=sum(size * n for size, n in self._sizes.items()),
            max_batch_size=max(self._sizes, default=0),
            histogram=dict(sorted(self._sizes.items())),
        )


def queued(item: object) -> tuple[object, float]:
    return item, time.monotonic()


async def submit(batched: Callable[[Any], Awaitable[tuple]], payloads: list[Any]) -> list[Any]:
    """Send each payload through a @serve.batch method (built with `BatchRecorder.begin`
    and `finish`); record on the request's span the largest batch it rode in and its
    longest queue wait; return the results in order."""
    results = await asyncio.gather(*(batched(queued(p)) for p in payloads))
    annotate(
        **{
            "servegraph.batch.size": max(r[1] for r in results),
            "servegraph.batch.queue_wait_ms": max(r[2] for r in results),
        }
    )
    return [r[0] for r in results]
