"""Runtime overhead per hop: a chain of N trivial nodes against one trivial node,
in-process and on Ray Serve over HTTP, in one run. ``python -m benchmarks.graph_overhead``."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import httpx
from ray import serve

from benchmarks import report
from benchmarks.report import Figure
from benchmarks.trivial import CATALOG, Echo, chain, raw_chain_app
from servegraph import InProcessRuntime
from servegraph.deploy.local_ray import local_cluster
from servegraph.deploy.planner import plan_platform
from servegraph.security.client import client_headers

N = 10
REPEATS = 200


class LocalEcho:
    async def bump(self, request):
        return await Echo.func_or_class.bump(None, request)


def per_call(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def in_process() -> dict[str, float]:
    runtime = InProcessRuntime(CATALOG, {"echo": LocalEcho()})
    loop = asyncio.new_event_loop()
    out = {}
    for kind in ("function", "call"):
        # Compiled once, as the ingress does: the per-hop cost of running, not validating.
        one, many = runtime.compile(chain(1, kind).build()), runtime.compile(chain(N, kind).build())
        t1 = per_call(lambda g=one: loop.run_until_complete(runtime.run(g, {"value": 0})), REPEATS)
        tn = per_call(lambda g=many: loop.run_until_complete(runtime.run(g, {"value": 0})), REPEATS)
        out[kind] = (tn - t1) / (N - 1)
        print(
            f"in-process {kind:8s}: 1 node {t1 * 1e3:.3f} ms, {N} nodes {tn * 1e3:.3f} ms, "
            f"per hop {out[kind] * 1e6:.0f} µs"
        )
    return out


def per_hop(paths: dict[str, Callable[[int], None]], n: int, rounds: int) -> dict[str, float]:
    """Seconds per hop of each path: the median over `rounds` of (an `n`-node chain's
    time - a 1-node chain's) / (n - 1). Each round times every path's two chains back
    to back, in alternating order, so that the machine's drift (a 2-core machine's
    other work, Ray's own) falls on both sides of each difference and on every path
    alike; timed apart, as before, the ratio moved from 1.01 to 1.33 between runs."""
    for call in paths.values():  # warm: handles made, routes compiled
        call(1)
        call(n)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(rounds):
        for name, call in paths.items():
            took = {}
            for size in (1, n) if round_ % 2 == 0 else (n, 1):
                started = time.perf_counter()
                call(size)
                took[size] = time.perf_counter() - started
            samples[name].append((took[n] - took[1]) / (n - 1))
    return {name: statistics.median(values) for name, values in samples.items()}


def on_serve() -> dict[str, float]:
    graphs = [chain(n, kind).build() for kind in ("function", "call") for n in (1, N)]
    with local_cluster(dashboard=False) as cluster:
        plan_platform(graphs, CATALOG, catalog_path="benchmarks.trivial:CATALOG").deploy()
        # The same hops on bare Serve: a chain of n call nodes makes n + 1 calls.
        serve.run(raw_chain_app(), name="rawchain", route_prefix="/rawchain")
        with httpx.Client(
            headers=client_headers(), base_url=cluster.base_url, timeout=30
        ) as client:

            def pipeline(kind: str) -> Callable[[int], None]:
                def call(n: int) -> None:
                    r = client.post(f"/pipelines/{kind}_chain_{n}", json={"value": 0})
                    r.raise_for_status()

                return call

            def raw(n: int) -> None:
                client.post("/rawchain", json={"value": 0, "n": n + 1}).raise_for_status()

            out = per_hop(
                {"function": pipeline("function"), "call": pipeline("call"), "raw_serve": raw},
                N,
                REPEATS,
            )
    for name, seconds in out.items():
        print(f"on Serve   {name:9s}: per hop {seconds * 1e3:.2f} ms")
    return out


def main() -> None:
    local = in_process()
    served = on_serve()
    report.save(
        "graph_overhead",
        [
            Figure(
                "per-hop cost of a call node on Serve",
                served["call"] * 1e3,
                None,
                "ms",
                "<= 1.5",
                higher_is_better=False,
            ),
            Figure(
                "per-hop cost of a call node, servegraph / bare Serve handle call",
                served["call"] * 1e3,
                served["raw_serve"] * 1e3,
                "ms",
                "<= 1.1",
                higher_is_better=False,
            ),
            Figure(
                "per-hop cost of a call node in-process",
                local["call"] * 1e3,
                None,
                "ms",
                "<= 1.5",
                higher_is_better=False,
            ),
        ],
    )


if __name__ == "__main__":
    main()
