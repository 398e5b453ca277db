"""Counting what @serve.batch actually did, so tests, benchmarks and dashboards see it.

Each batched item carries the time it was queued, and each result carries the batch
size and that wait back to its request, whose span records them.
"""

from __future__ import annotations

import time
from collections import Counter

from deployments.schemas import BatchStats
from servegraph.metrics import batch_size_histogram


class BatchRecorder:
    """Counts batch sizes for `/stats`, and exports them as a Serve metric."""

    def __init__(self, server: str) -> None:
        self._sizes: Counter[int] = Counter()
        self._histogram = batch_size_histogram(server)

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


def waited_ms(queued_at: float, started: float) -> float:
    return round((started - queued_at) * 1000, 3)
