"""Batch against online, one run (issue 15): the same `rag` questions through
`servegraph batch` (Ray Data actors running the graph against the model servers) and
through the online route at several concurrencies, rows per second side by side.

    .venv/bin/python -m benchmarks.batch [rows]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.platform_up import serving_everything
from benchmarks.traffic import callers

TOPICS = [
    "refunds",
    "password resets",
    "shipping times",
    "returns of opened items",
    "changing plans",
    "wifi problems",
    "order tracking",
    "account locks",
]


def questions(n: int) -> list[dict]:
    return [
        {
            "id": f"q{i}",
            "question": f"What should I know about {TOPICS[i % len(TOPICS)]}? ({i})",
            "max_tokens": 48,
        }
        for i in range(n)
    ]


async def online(base_url: str, rows: list[dict], concurrency: int) -> float:
    """Rows per second through POST /pipelines/rag with `concurrency` closed-loop callers."""
    stop = asyncio.Event()
    started = time.monotonic()
    answers = await callers(
        base_url,
        "/pipelines/rag",
        lambda c, i: {k: v for k, v in rows[(c * 997 + i) % len(rows)].items() if k != "id"},
        n=concurrency,
        stop=stop,
        max_requests=len(rows),
        max_seconds=600,
    )
    seconds = time.monotonic() - started
    ok = sum(a.status == 200 for a in answers)
    print(f"online @{concurrency}: {ok}/{len(answers)} ok, {ok / seconds:.2f} rows/s")
    return ok / seconds


def main(n: int) -> None:
    from servegraph.offline import batch

    rows = questions(n)
    with serving_everything(dashboard=False) as cluster:
        asyncio.run(online(cluster.base_url, rows[:16], 8))  # warm-up
        best = max(asyncio.run(online(cluster.base_url, rows, c)) for c in (16, 32, 64))
        folder = Path(tempfile.mkdtemp(prefix="servegraph-bench-batch-"))
        (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = batch("rag", folder / "in.jsonl", folder / "out.jsonl", concurrency=64)
        print(
            f"batch: {result.written - result.failed}/{result.written} ok, "
            f"{result.rows_per_s:.2f} rows/s"
        )
    report.save(
        "batch",
        [
            report.Figure(
                "batch vs online at its best concurrency, rag rows/s",
                (result.written - result.failed) / result.seconds,
                best,
                "rows/s",
                ">= 2",
            )
        ],
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
