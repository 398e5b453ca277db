"""Per-request cost of the API-key check (`servegraph.security`), in process (no Ray): the
pipeline ingress app with a trivial toy server over ASGI, 64 concurrent callers, keys off
vs an admin key vs a limited key (in-process buckets). A real request costs milliseconds
to seconds of model work; this isolates the check.

    .venv/bin/python -m benchmarks.auth_overhead
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from servegraph import Pipeline
from servegraph.security.guard import Guard
from servegraph.security.keys import AuthSettings, KeyStore
from servegraph.security.limits import Limiter
from servegraph.serving.ingress import build_fastapi
from tests.servegraph import toy
from tests.servegraph.test_http_stream import ToyInvoker


class NoUsage:
    def record(self, key: str, status: int, tokens: dict[str, int] | None = None) -> None:
        pass


class Fast:
    async def sleep(self, request: toy.Sleep) -> toy.Echo:
        return toy.Echo(text="x")


async def requests_per_s(graphs: dict, headers: dict[str, str], n: int = 3000) -> float:
    app = build_fastapi(graphs, toy.CATALOG, ToyInvoker({"flaky": Fast()}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=headers) as c:
        gate = asyncio.Semaphore(64)

        async def one() -> None:
            async with gate:
                answer = await c.post("/fast", json={"seconds": 0})
                assert answer.status_code == 200, answer.text

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - started)


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    store = KeyStore(folder / "keys.sqlite3")
    admin = store.create("bench", ["admin"])
    limited = store.create("bench-limited", ["admin"], requests_per_s=1e9)
    p = Pipeline("fast", input=toy.Sleep, output=toy.Echo)
    p.returns(p.call("c", "flaky", "sleep", seconds=p.input.seconds))
    graphs = {"fast": p.build()}
    results = {}
    for label, unsafe, key in [
        ("keys off (unsafe)", True, None),
        ("admin key", False, admin),
        ("limited key (in-process buckets)", False, limited),
    ]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        runs = []
        for _ in range(3):
            settings = AuthSettings(keys=folder / "keys.sqlite3", unsafe_disabled=unsafe)
            Guard._here = Guard(settings, limiter=Limiter(), usage=NoUsage())
            runs.append(asyncio.run(requests_per_s(graphs, headers)))
        results[label] = statistics.median(runs)
    base = results["keys off (unsafe)"]
    print("| caller | requests/s (median of 3) | vs keys off |\n| --- | --- | --- |")
    for label, value in results.items():
        print(f"| {label} | {value:.0f} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
