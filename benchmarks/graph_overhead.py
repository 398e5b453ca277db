"""Runtime overhead per hop: a chain of N trivial nodes against one trivial node,
in-process and on Ray Serve over HTTP, in one run. ``python -m benchmarks.graph_overhead``."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from ray import serve

from benchmarks import report
from benchmarks.report import Figure
from benchmarks.trivial import CATALOG, Echo, chain, raw_chain_app
from servegraph import InProcessRuntime
from servegraph.auth import client_headers
from servegraph.local_ray import local_cluster
from servegraph.planner import plan_platform

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


def on_serve() -> dict[str, float]:
    graphs = [chain(n, kind).build() for kind in ("function", "call") for n in (1, N)]
    out = {}
    with local_cluster(dashboard=False) as cluster:
        plan_platform(graphs, CATALOG, catalog_path="benchmarks.trivial:CATALOG").deploy()
        with httpx.Client(
            headers=client_headers(), base_url=cluster.base_url, timeout=30
        ) as client:
            for kind in ("function", "call"):

                def call(n: int, kind: str = kind) -> None:
                    r = client.post(f"/pipelines/{kind}_chain_{n}", json={"value": 0})
                    r.raise_for_status()

                t1 = per_call(lambda: call(1), REPEATS // 2)
                tn = per_call(lambda: call(N), REPEATS // 2)
                out[kind] = (tn - t1) / (N - 1)
                print(
                    f"on Serve   {kind:8s}: 1 node {t1 * 1e3:.2f} ms, {N} nodes "
                    f"{tn * 1e3:.2f} ms, per hop {out[kind] * 1e3:.2f} ms"
                )
            # The same hops on bare Serve: a chain of N call nodes makes N + 1 calls.
            serve.run(raw_chain_app(), name="rawchain", route_prefix="/rawchain")

            def raw(n: int) -> None:
                client.post("/rawchain", json={"value": 0, "n": n}).raise_for_status()

            t1 = per_call(lambda: raw(2), REPEATS // 2)
            tn = per_call(lambda: raw(N + 1), REPEATS // 2)
            out["raw_serve"] = (tn - t1) / (N - 1)
            print(f"bare Serve handle calls: per hop {out['raw_serve'] * 1e3:.2f} ms")
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
