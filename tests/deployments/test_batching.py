"""The batching helpers shared by the embedder and classifier. `@serve.batch` itself
needs a replica, so real batching is tested in tests/integration."""

from __future__ import annotations

from deployments._batching import BatchRecorder, submit


async def test_submit_returns_results_in_order() -> None:
    seen = []

    async def batched(item: tuple[int, float]) -> tuple:
        seen.append(item)
        number, _queued_at = item
        return number * 2, 4, 1.5

    assert await submit(batched, [1, 2, 3]) == [2, 4, 6]
    assert [n for n, _ in seen] == [1, 2, 3] and all(isinstance(t, float) for _, t in seen)


def test_begin_counts_and_finish_reports_size_and_queue_wait() -> None:
    recorder = BatchRecorder("test")
    payloads, started = recorder.begin([("a", 10.0), ("b", 10.5)])
    assert payloads == ["a", "b"] and recorder.stats().histogram == {2: 1}
    items = [("a", 10.0), ("b", 10.5)]
    assert BatchRecorder.finish(["A", "B"], items, 11.0) == [("A", 2, 1000.0), ("B", 2, 500.0)]
    assert started > 0
