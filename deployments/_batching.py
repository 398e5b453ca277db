"""Counting what @serve.batch actually did, so tests and benchmarks can see it batch."""

from __future__ import annotations

from collections import Counter

from deployments.schemas import BatchStats


class BatchRecorder:
    def __init__(self) -> None:
        self._sizes: Counter[int] = Counter()

    def record(self, size: int) -> None:
        self._sizes[size] += 1

    def stats(self) -> BatchStats:
        return BatchStats(
            batches=sum(self._sizes.values()),
            items=sum(size * n for size, n in self._sizes.items()),
            max_batch_size=max(self._sizes, default=0),
            histogram=dict(sorted(self._sizes.items())),
        )
