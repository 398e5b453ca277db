"""The readers-writer lock: readers share, a writer is alone, a waiting writer is not
starved by a stream of readers."""

from __future__ import annotations

import threading

from deployments.vector_index._rwlock import ReadWriteLock


def test_readers_share_and_a_writer_excludes_everyone() -> None:
    lock = ReadWriteLock()
    inside = {"readers": 0, "writers": 0, "max_readers": 0}
    guard = threading.Lock()
    both_reading = threading.Barrier(2, timeout=10)
    violations: list[str] = []

    def reader() -> None:
        with lock.reading():
            with guard:
                inside["readers"] += 1
                inside["max_readers"] = max(inside["max_readers"], inside["readers"])
                if inside["writers"]:
                    violations.append("reader beside a writer")
            both_reading.wait()  # two readers are inside at once, or this times out
            with guard:
                inside["readers"] -= 1

    def writer() -> None:
        for _ in range(200):
            with lock.writing():
                with guard:
                    inside["writers"] += 1
                    if inside["writers"] > 1 or inside["readers"]:
                        violations.append("writer not alone")
                with guard:
                    inside["writers"] -= 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    threads += [threading.Thread(target=writer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not violations, violations[:3]
    assert inside["max_readers"] == 2


def test_a_waiting_writer_blocks_new_readers() -> None:
    lock = ReadWriteLock()
    order: list[str] = []
    first_reader_in = threading.Event()
    writer_waiting = threading.Event()
    release_first = threading.Event()

    def first_reader() -> None:
        with lock.reading():
            first_reader_in.set()
            release_first.wait(10)
        order.append("first reader out")

    def writer() -> None:
        writer_waiting.set()
        with lock.writing():
            order.append("writer")

    def late_reader() -> None:
        with lock.reading():
            order.append("late reader")

    t1 = threading.Thread(target=first_reader)
    t1.start()
    first_reader_in.wait(10)
    t2 = threading.Thread(target=writer)
    t2.start()
    writer_waiting.wait(10)
    # Wait (bounded) until the writer is registered as waiting inside the lock.
    for _ in range(10_000):
        if lock._writers_waiting:
            break
        threading.Event().wait(0.001)
    t3 = threading.Thread(target=late_reader)
    t3.start()
    release_first.set()
    for thread in (t1, t2, t3):
        thread.join(10)
    assert order.index("writer") < order.index("late reader")
