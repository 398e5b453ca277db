"""RAG latency (p50/p99 at 1 and 16 concurrent requests) and the agent's routing accuracy,
on Ray Serve against the same graph run in-process on the raw models, in one run.

    .venv/bin/python -m benchmarks.pipelines
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from deployments.catalog import CATALOG
from deployments.classifier_training import load_tickets
from pipelines.rag.ingest import build_pipeline as build_ingest
from pipelines.rag.ingest import knowledge_base
from pipelines.rag.qa import build_pipeline as build_rag

QUESTIONS = [
    "How long do refunds take after a return?",
    "Is return shipping free?",
    "How long is the password reset link valid?",
    "How long does express delivery take?",
    "Does the Nimbus headphones box include a charger?",
    "What should I do about phishing?",
    "How do I download a VAT invoice?",
    "What happens after 5 failed logins?",
]
SEQUENTIAL, CONCURRENT, CONCURRENCY = 16, 48, 16


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000, "n": len(ordered)}


async def latencies(call, n: int, concurrency: int) -> list[float]:
    samples: list[float] = []
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            await call(QUESTIONS[i % len(QUESTIONS)])
            samples.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def held_out_tickets(per_label: int = 4) -> list[dict]:
    picked: dict[str, list[dict]] = {}
    for ticket in load_tickets():
        if ticket["split"] == "test" and len(picked.setdefault(ticket["label"], [])) < per_label:
            picked[ticket["label"]].append(ticket)
    return [t for group in picked.values() for t in group]


def raw(index: Path) -> dict:
    from deployments.local import local_servers
    from servegraph import LocalRuntime

    runtime = LocalRuntime(CATALOG, local_servers(index))
    rag = build_rag().build()
    asyncio.run(
        runtime.run(
            build_ingest().build(), {"documents": [d.model_dump() for d in knowledge_base()]}
        )
    )

    async def ask(question: str) -> None:
        await runtime.run(rag, {"question": question})

    asyncio.run(ask("warm up"))
    result = {
        "rag_c1": percentiles(asyncio.run(latencies(ask, SEQUENTIAL, 1))),
        "rag_c16": percentiles(asyncio.run(latencies(ask, CONCURRENT, CONCURRENCY))),
    }
    return result


def served() -> dict:
    from ray import serve

    from pipelines.rag.ingest import on_deploy
    from servegraph.compiler import compile_platform
    from servegraph.discovery import discover
    from servegraph.local import local_cluster

    with local_cluster(dashboard=False) as cluster:
        compile_platform(
            discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True
        ).deploy()
        while any(a.status != "RUNNING" for a in serve.status().applications.values()):
            time.sleep(1)
        on_deploy(cluster.base_url)

        async def run() -> dict:
            async with httpx.AsyncClient(base_url=cluster.base_url, timeout=600) as client:

                async def ask(question: str) -> None:
                    (
                        await client.post("/pipelines/rag", json={"question": question})
                    ).raise_for_status()

                await ask("warm up")
                out = {
                    "rag_c1": percentiles(await latencies(ask, SEQUENTIAL, 1)),
                    "rag_c16": percentiles(await latencies(ask, CONCURRENT, CONCURRENCY)),
                }
                tickets = held_out_tickets()
                semaphore = asyncio.Semaphore(8)

                async def triage(ticket: dict) -> bool:
                    async with semaphore:
                        response = await client.post(
                            "/pipelines/triage", json={"text": ticket["text"]}
                        )
                        response.raise_for_status()
                        return response.json()["team"] == ticket["label"]

                hits = await asyncio.gather(*(triage(t) for t in tickets))
                out["agent_routing_accuracy"] = sum(hits) / len(hits)
                out["agent_tickets"] = len(hits)
                return out

        return asyncio.run(run())


def main() -> None:
    with tempfile.TemporaryDirectory() as index:
        baseline = raw(Path(index))
    on_serve = served()
    print(json.dumps({"in_process_raw_models": baseline, "serve": on_serve}, indent=2))
    for key in ("rag_c1", "rag_c16"):
        ratio = on_serve[key]["p50_ms"] / baseline[key]["p50_ms"]
        print(
            f"{key}: serve p50 {on_serve[key]['p50_ms']:.0f} ms p99 "
            f"{on_serve[key]['p99_ms']:.0f} ms | in-process p50 "
            f"{baseline[key]['p50_ms']:.0f} ms p99 {baseline[key]['p99_ms']:.0f} ms | "
            f"serve/in-process p50 {ratio:.2f}"
        )
    print(
        f"agent routing accuracy: {on_serve['agent_routing_accuracy']:.3f} "
        f"on {on_serve['agent_tickets']} held-out tickets"
    )


if __name__ == "__main__":
    main()
