"""Open-loop load: requests arrive at a fixed average rate (Poisson arrivals) whatever the
target's speed, so queueing shows as latency instead of slowing the sender down (a
closed loop of N callers hides it: a slow server simply receives less).

    .venv/bin/python -m benchmarks.load URL PATH --rate 50 --seconds 20 --body '{"text": "hi"}'

Reports throughput (answers per second), p50/p99 latency of the answers, and goodput:
requests answered 200 within their deadline, per second. Every request carries the
deadline as `X-Request-Timeout` and the client gives up at deadline + 5 s. Traffic goes
to 127.0.0.1 only; count and time are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import httpx

from servegraph.security.client import client_headers

# What a benchmark of a pipeline's work sends: run the graph, keep nothing
# (`servegraph.serving.answer_cache`). Benchmarks repeat a few questions, so with the
# answer cache on (the default for every tenant) a repeated `rag` question would be
# answered from the cache, and the figure would be the cache's, not the pipeline's;
# `benchmarks.cache` measures the cache itself.
UNCACHED = {"Cache-Control": "no-cache, no-store"}


@dataclass
class LoadResult:
    target: str
    rate_rps: float
    seconds: float
    sent: int
    statuses: dict[str, int]
    throughput_rps: float
    goodput_rps: float
    p50_ms: float
    p99_ms: float
    # CPU-seconds this process spent while the load ran (the load generator's own cost,
    # with whatever else the process did meanwhile, e.g. a Ray driver's threads): a figure
    # whose client sat near a core's worth is the client's, not the platform's.
    client_cpu_s: float = float("nan")

    def row(self) -> str:
        return (
            f"{self.target:44s} {self.rate_rps:6.1f} {self.throughput_rps:8.2f} "
            f"{self.goodput_rps:8.2f} {self.p50_ms:9.0f} {self.p99_ms:9.0f} "
            f"{self.client_cpu_s:7.1f}  {self.statuses}"
        )


HEADER = (
    f"{'target':44s} {'rate':>6s} {'thru/s':>8s} {'good/s':>8s} {'p50 ms':>9s} {'p99 ms':>9s} "
    f"{'cli CPU':>7s}  statuses"
)


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def poisson(
    one: Callable[[int], Awaitable[None]], *, rate_rps: float, seconds: float, seed: int = 0
) -> int:
    """Start `one(i)` at Poisson arrivals of `rate_rps` for `seconds`, whether or not the
    earlier ones have finished; wait for all; return how many were started."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    began, next_at = time.perf_counter(), 0.0
    while next_at < seconds:
        await asyncio.sleep(max(0.0, began + next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(len(tasks))))
        next_at += rng.expovariate(rate_rps)
    await asyncio.gather(*tasks)
    return len(tasks)


async def open_loop(
    base_url: str,
    path: str,
    body_for: Callable[[int], dict],
    *,
    rate_rps: float,
    seconds: float,
    deadline_s: float,
    target: str | None = None,
    seed: int = 0,
    max_connections: int = 512,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Send `body_for(i)` at Poisson arrivals of `rate_rps` for `seconds`; wait for every
    answer (or the client's give-up at deadline + 5 s); summarise. `headers` are sent
    with every request, beside the deadline's."""
    latencies: list[float] = []
    good = 0
    statuses: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
    per_request = {**(headers or {}), "X-Request-Timeout": f"{deadline_s:g}"}
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=deadline_s + 5, limits=limits
    ) as client:

        async def one(i: int) -> None:
            nonlocal good
            started = time.perf_counter()
            try:
                response = await client.post(path, json=body_for(i), headers=per_request)
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - started
            statuses[status] += 1
            latencies.append(elapsed)
            if status == "200" and elapsed <= deadline_s:
                good += 1

        began, cpu = time.perf_counter(), time.process_time()
        sent = await poisson(one, rate_rps=rate_rps, seconds=seconds, seed=seed)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    answered = sum(n for s, n in statuses.items() if s.isdigit())
    return LoadResult(
        target=target or path,
        rate_rps=rate_rps,
        seconds=round(elapsed, 1),
        sent=sent,
        statuses=dict(statuses),
        throughput_rps=answered / elapsed,
        goodput_rps=good / elapsed,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p99_ms=percentile(latencies, 0.99) * 1000,
        client_cpu_s=cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("path")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--deadline", type=float, default=10)
    parser.add_argument("--body", default="{}", help="JSON body of every request")
    args = parser.parse_args()
    if not args.base_url.startswith(("http://127.0.0.1", "http://localhost")):
        parser.error("load is sent to this machine only (http://127.0.0.1:...)")
    body = json.loads(args.body)
    result = asyncio.run(
        open_loop(
            args.base_url,
            args.path,
            lambda _: body,
            rate_rps=args.rate,
            seconds=args.seconds,
            deadline_s=args.deadline,
        )
    )
    print(HEADER)
    print(result.row())
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
