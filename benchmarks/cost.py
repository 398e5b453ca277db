"""What requests cost, one run (issue 15): cost and energy per 1,000 `rag` and `triage`
requests on the default price and power tables; how much of a saturated replica's
time the meters attribute to requests (against its uptime x resources); and what the
metering costs a request at p50.

    .venv/bin/python -m benchmarks.cost
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from benchmarks import report
from benchmarks.platform_up import serving_everything

TICKETS = [
    {"text": "Where is my order 12345? It has not arrived.", "email": "ana@example.com"},
    {"text": "I was charged twice for order 12346.", "email": "ben@example.com"},
    {"text": "My account is locked, I cannot log in.", "email": "carla@example.com"},
    {"text": "The headphones will not connect to wifi."},
]
QUESTIONS = [
    "How long do refunds take after a return?",
    "How do I reset my password?",
    "Can I return an opened item?",
    "How long does shipping take?",
]


async def per_thousand(base_url: str, path: str, bodies: list[dict], n: int) -> dict[str, float]:
    """Mean USD and joules of `n` requests (8 at a time), times 1,000."""
    import json

    import httpx

    from servegraph.auth import client_headers

    usages: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=base_url, headers=client_headers(), timeout=300) as c:

        async def one(i: int) -> None:
            async with gate:
                response = await c.post(path, json=bodies[i % len(bodies)])
                if response.status_code == 200:
                    usages.append(json.loads(response.headers["x-servegraph-usage"]))

        await asyncio.gather(*(one(i) for i in range(n)))
    return {
        "usd": 1000 * statistics.mean(u["usd"] for u in usages),
        "joules": 1000 * statistics.mean(u["joules"] for u in usages),
        "ok": len(usages),
    }


async def attributed(server: str, method: str, body: dict, callers: int, seconds: float) -> float:
    """Saturate one replica of `server` with `callers` closed-loop callers for about
    `seconds`; the resource-seconds its meter charged them, over its uptime in that
    window x its resources (first call's start to last call's end)."""
    from deployments.catalog import CATALOG
    from servegraph.gateway import method_graph
    from servegraph.handles import ServeInvoker
    from servegraph.runtime import NodeRecord, Runtime

    runtime = Runtime(CATALOG, ServeInvoker(CATALOG))
    graph = runtime.compile(method_graph(CATALOG[server], method))
    charges: list[dict[str, float]] = []
    first, last = [], []
    stop = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop:
            records: list[NodeRecord] = []
            first.append(time.monotonic())
            await runtime.execute(graph, body, records=records)
            last.append(time.monotonic())
            charges.extend(r.charge for r in records if r.charge)

    await asyncio.gather(*(caller() for _ in range(callers)))
    window = max(last) - min(first)
    charged = sum(c.get("cpu_s", 0.0) for c in charges)
    held = _replica_cpus(server)
    print(
        f"{server}.{method}: {len(charges)} calls, {charged:.2f} CPU-s charged over "
        f"{window:.1f} s x {held:g} CPUs = {window * held:.2f}"
    )
    return charged / (window * held)


def _replica_cpus(server: str) -> float:
    """The CPUs one replica of `server` holds (its placement group's, or its actor's),
    as the capacity check reads them from the built application; one replica running."""
    from ray import serve

    from deployments.catalog import CATALOG
    from servegraph.capacity import asks_of
    from servegraph.handles import deployment_name
    from servegraph.planner import plan_platform

    name = deployment_name(CATALOG[server])
    details = serve.context._get_global_client().get_serve_details()
    replicas = details["applications"][server]["deployments"][name]["replicas"]
    running = [r for r in replicas if str(r["state"]).endswith("RUNNING")]
    assert len(running) == 1, f"{server}: {len(running)} replicas; the window needs one"
    (ask,) = [
        a for a in asks_of(plan_platform([], CATALOG, all_servers=True)) if a.deployment == name
    ]
    return sum(bundle.get("CPU", 0.0) for bundle in ask.bundles)


def meter_overhead_us(in_flight: int = 64, rounds: int = 20_000) -> float:
    """One start/stop pair's cost (µs) with `in_flight` other requests on the meter."""
    from servegraph.cost import Meter

    meter = Meter({"cpu": 2.0, "gpu": 0.0, "gib": 0.0})
    others = [meter.start() for _ in range(in_flight)]
    started = time.perf_counter()
    for _ in range(rounds):
        meter.stop(meter.start())
    spent = (time.perf_counter() - started) / rounds * 1e6
    for ticket in others:
        meter.stop(ticket)
    return spent


async def embed_one_p50_ms(base_url: str) -> float:
    import httpx

    from servegraph.auth import client_headers

    times = []
    async with httpx.AsyncClient(base_url=base_url, headers=client_headers(), timeout=60) as c:
        for i in range(50):
            started = time.perf_counter()
            await c.post("/embedder/embed_one", json={"text": f"refunds {i}"})
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    with serving_everything(dashboard=False) as cluster:
        rag = asyncio.run(
            per_thousand(
                cluster.base_url, "/pipelines/rag", [{"question": q} for q in QUESTIONS], 40
            )
        )
        triage = asyncio.run(per_thousand(cluster.base_url, "/pipelines/triage", TICKETS, 24))
        print(f"rag per 1,000: ${rag['usd']:.4f}, {rag['joules'] / 3600:.2f} Wh ({rag['ok']} ok)")
        print(
            f"triage per 1,000: ${triage['usd']:.4f}, {triage['joules'] / 3600:.2f} Wh "
            f"({triage['ok']} ok)"
        )
        vector = asyncio.run(_query_vector())
        index = asyncio.run(attributed("vector_index", "search", {"vector": vector}, 32, 15))
        chat = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 32}
        llm = asyncio.run(attributed("llm", "chat", chat, 32, 30))
        p50 = asyncio.run(embed_one_p50_ms(cluster.base_url))
    overhead = meter_overhead_us()
    print(f"meter start+stop with 64 in flight: {overhead:.1f} µs; embed_one p50 {p50:.1f} ms")
    report.save(
        "cost",
        [
            report.Figure("rag: USD per 1,000 requests", rag["usd"], None, "USD", ""),
            report.Figure("rag: Wh per 1,000 requests", rag["joules"] / 3600, None, "Wh", ""),
            report.Figure("triage: USD per 1,000 requests", triage["usd"], None, "USD", ""),
            report.Figure("triage: Wh per 1,000", triage["joules"] / 3600, None, "Wh", ""),
            report.Figure(
                "attributed / uptime x CPUs, vector index saturated", index, None, "ratio", ">= 0.9"
            ),
            report.Figure(
                "attributed / uptime x CPUs, LLM saturated", llm, None, "ratio", ">= 0.9"
            ),
            report.Figure(
                "metering per request / embed_one p50",
                overhead / 1000 / p50 * 100,
                None,
                "%",
                "< 1",
                higher_is_better=False,
            ),
        ],
    )


async def _query_vector() -> list[float]:
    from deployments.catalog import CATALOG
    from deployments.embedder.contract import EmbedOneRequest
    from servegraph.handles import ServeInvoker

    embedding = await ServeInvoker(CATALOG)(
        "embedder", "embed_one", EmbedOneRequest(text="refunds")
    )
    return [float(x) for x in embedding.vector]


if __name__ == "__main__":
    main()
