"""What requests cost, one run (issue 15): cost and energy per 1,000 `rag` and `triage`
requests on the default price and power tables; how much of a saturated replica's
time the meters attribute to requests (against its uptime x resources); what the
metering costs a request at p50; and how `rag` requests with a maximum cost (a
fraction of its mean cost, 8 callers at once) end: stopped (402), answered with
max_tokens lowered, or answered whole, and what they spent against their maximum.

    .venv/bin/python -m benchmarks.cost
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from benchmarks import report
from benchmarks.load import UNCACHED
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

    from servegraph.security.client import client_headers

    usages: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(8)
    # what making an answer costs: neither the answer cache's hits nor its lookups (UNCACHED)
    every_request = client_headers() | UNCACHED
    async with httpx.AsyncClient(base_url=base_url, headers=every_request, timeout=300) as c:

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


async def attributed(
    server: str, method: str, body: dict, callers: int, seconds: float
) -> dict[str, float]:
    """Saturate one replica of `server` with `callers` closed-loop callers for about
    `seconds`; the resource-seconds its meter charged them, over its uptime in that
    window x its resources (first call's start to last call's end). For a server whose
    meter reports itself (`meter_stats`), also how much of the window the replica had
    a call in flight, and the CPU-seconds its process actually used (psutil)."""
    from deployments.catalog import CATALOG
    from servegraph.engine.runtime import NodeRecord, Runtime
    from servegraph.serving.gateway import method_graph
    from servegraph.serving.handles import ServeInvoker

    runtime = Runtime(CATALOG, ServeInvoker(CATALOG))
    graph = runtime.compile(method_graph(CATALOG[server], method))
    charges: list[dict[str, float]] = []
    first, last = [], []
    replica = _replica(server)
    busy_before, cpu_before = await _busy_s(server), _process_cpu_s(replica)
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
    busy = (await _busy_s(server)) - busy_before
    used = _process_cpu_s(replica) - cpu_before
    charged = sum(c.get("cpu_s", 0.0) for c in charges)
    held = _replica_cpus(server)
    print(
        f"{server}.{method}: {len(charges)} calls, {charged:.2f} CPU-s charged over "
        f"{window:.1f} s x {held:g} CPUs = {window * held:.2f}; a call in flight "
        f"{busy:.2f} s of the {window:.1f} s; its process used {used:.2f} CPU-s"
    )
    return {
        "attributed": charged / (window * held),
        "busy": busy / window,
        "process_cpu_s_per_s": used / window,
    }


def _replica(server: str) -> dict[str, Any]:
    """The one running replica of `server`, as Serve details it (with its pid)."""
    from ray import serve

    from deployments.catalog import CATALOG
    from servegraph.serving.handles import deployment_name

    name = deployment_name(CATALOG[server])
    details = serve.context._get_global_client().get_serve_details()
    replicas = details["applications"][server]["deployments"][name]["replicas"]
    running = [r for r in replicas if str(r["state"]).endswith("RUNNING")]
    assert len(running) == 1, f"{server}: {len(running)} replicas; the window needs one"
    return running[0]


async def _busy_s(server: str) -> float:
    """The replica's meter's busy seconds so far (nan where it does not report them)."""
    from ray import serve

    from deployments.catalog import CATALOG
    from servegraph.serving.handles import deployment_name

    handle = serve.get_deployment_handle(deployment_name(CATALOG[server]), app_name=server)
    try:
        return float((await handle.meter_stats.remote())["busy_s"])
    except Exception:  # the LLM's engine meters inside its own class
        return float("nan")


def _process_cpu_s(replica: dict[str, Any]) -> float:
    import psutil

    times = psutil.Process(int(replica["pid"])).cpu_times()
    return times.user + times.system


def _replica_cpus(server: str) -> float:
    """The CPUs one replica of `server` holds (its placement group's, or its actor's),
    as the capacity check reads them from the built application."""
    from deployments.catalog import CATALOG
    from servegraph.deploy.capacity.inputs import asks_of
    from servegraph.deploy.planner import plan_platform
    from servegraph.serving.handles import deployment_name

    name = deployment_name(CATALOG[server])
    (ask,) = [
        a for a in asks_of(plan_platform([], CATALOG, all_servers=True)) if a.deployment == name
    ]
    return sum(bundle.get("CPU", 0.0) for bundle in ask.bundles)


async def budgets(base_url: str, mean_usd: float) -> dict[str, dict[str, float]]:
    """8 concurrent `rag` requests at each maximum (a fraction of `mean_usd`)."""
    import json

    import httpx

    from servegraph.security.client import client_headers

    outcomes: dict[str, dict[str, float]] = {}
    # what making an answer costs: neither the answer cache's hits nor its lookups (UNCACHED)
    every_request = client_headers() | UNCACHED
    async with httpx.AsyncClient(base_url=base_url, headers=every_request, timeout=300) as c:
        for fraction in (0.05, 0.25, 0.5, 0.75, 1.0, 1.5):
            maximum = mean_usd * fraction
            headers = {"x-servegraph-max-cost-usd": repr(maximum)}
            answers = await asyncio.gather(
                *(
                    c.post("/pipelines/rag", json={"question": q}, headers=headers)
                    for q in QUESTIONS * 2
                )
            )
            stopped = [a for a in answers if a.status_code == 402]
            done = [json.loads(a.headers["x-servegraph-usage"]) for a in answers if a.is_success]
            capped = [u for u in done if u["budget"]["capped"]]
            if stopped:
                print(f"402 at {fraction} x mean: {stopped[0].text}")
            spent = [u["usd"] / maximum for u in done]
            outcomes[f"{fraction:g}"] = {
                "stopped": len(stopped),
                "capped": len(capped),
                "whole": len(done) - len(capped),
                "other": len(answers) - len(stopped) - len(done),
                "max_spent_over_max": max(spent, default=float("nan")),
            }
            print(f"maximum {fraction:g} x mean (${maximum:.3g}): {outcomes[f'{fraction:g}']}")
    return outcomes


def meter_overhead_us(in_flight: int = 64, rounds: int = 20_000) -> float:
    """One start/stop pair's cost (µs) with `in_flight` other requests on the meter."""
    from servegraph.cost.metering import Meter

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

    from servegraph.security.client import client_headers

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
        held = asyncio.run(budgets(cluster.base_url, rag["usd"] / 1000))
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
                "attributed / uptime x CPUs, vector index saturated",
                index["attributed"],
                None,
                "ratio",
                ">= 0.9",
            ),
            report.Figure(
                "vector index: share of the window with a call in flight",
                index["busy"],
                None,
                "ratio",
                "",
            ),
            report.Figure(
                "vector index: CPU-s its process used per second of the window",
                index["process_cpu_s_per_s"],
                None,
                "CPU",
                "",
            ),
            report.Figure(
                "attributed / uptime x CPUs, LLM saturated",
                llm["attributed"],
                None,
                "ratio",
                ">= 0.9",
            ),
            *(
                report.Figure(
                    f"rag at a maximum of {fraction} x its mean cost: most spent / maximum",
                    outcome["max_spent_over_max"],
                    None,
                    "ratio",
                    "",
                    higher_is_better=False,
                )
                for fraction, outcome in held.items()
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
    from servegraph.serving.handles import ServeInvoker

    embedding = await ServeInvoker(CATALOG)(
        "embedder", "embed_one", EmbedOneRequest(text="refunds")
    )
    return [float(x) for x in embedding.vector]


if __name__ == "__main__":
    main()
