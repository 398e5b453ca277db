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

from benchmarks.load import UNCACHED
from deployments.catalog import CATALOG
from deployments.classifier.training import load_tickets
from pipelines.rag.ingest import build_pipeline as build_ingest
from pipelines.rag.ingest import knowledge_base
from pipelines.rag.models import RagAnswer, RagQuery
from pipelines.rag.qa import build_prompt, make_answer, rank, split_passages
from servegraph.security.client import client_headers

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
SEQUENTIAL, CONCURRENT, CONCURRENCY = 8, 32, 16
AGENT_CONCURRENCY = 4
# measure the work, not the 60 s default deadline, nor the answer cache
DEADLINE = {"x-request-timeout": "300", **UNCACHED}


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


def held_out_tickets(per_label: int = 5) -> list[dict]:
    picked: dict[str, list[dict]] = {}
    for ticket in load_tickets():
        if ticket["split"] == "test" and len(picked.setdefault(ticket["label"], [])) < per_label:
            picked[ticket["label"]].append(ticket)
    return [t for group in picked.values() for t in group]


def raw(index: Path) -> dict:
    """The RAG steps on the raw models, called directly in this process: no graph, no Ray.

    One at a time for c1. For c16 a single process cannot serve 16 callers in parallel
    (vLLM's offline engine takes one call at a time), so the fair raw figure is the
    batched one: each group of 16 questions is embedded, searched and answered in one
    engine call, and every question in it waits for the whole group.
    """
    from deployments.classifier.contract import ClassifyRequest
    from deployments.embedder.contract import Embedding, EmbedRequest
    from deployments.llm.contract import ChatRequest
    from deployments.vector_index.contract import SearchRequest
    from servegraph import InProcessRuntime

    servers = CATALOG.in_process_servers(options={"vector_index": {"path": index}})
    embedder, vector_index, llm = servers["embedder"], servers["vector_index"], servers["llm"]
    asyncio.run(  # the same knowledge base, ingested by the same graph
        InProcessRuntime(CATALOG, servers).run(
            build_ingest().build(), {"documents": [d.model_dump() for d in knowledge_base()]}
        )
    )
    defaults = RagQuery(question="unused")

    async def answer_all(questions: list[str]) -> list[RagAnswer]:
        vectors = (await embedder.embed(EmbedRequest(texts=questions))).vectors
        # The index's methods are plain functions (a search is a few ms of FAISS).
        found = [vector_index.search(SearchRequest(vector=v, k=defaults.k)).hits for v in vectors]
        ranked = []  # the pipeline's re-ranking: each question's sentences in one call
        for question, vector, hits in zip(questions, vectors, found, strict=True):
            split = split_passages(question, hits)
            embedded = await embedder.embed(EmbedRequest(texts=split["texts"]))
            query = Embedding(vector=vector, dim=embedded.dim)
            ranked.append(rank(question, query, hits, split, embedded))
        prompts = [build_prompt(q, r) for q, r in zip(questions, ranked, strict=True)]
        replies = await llm.chat_many(
            [
                ChatRequest(
                    messages=p["messages"], json_schema=p["schema"], max_tokens=defaults.max_tokens
                )
                for p in prompts
            ]
        )
        return [make_answer(reply, r) for reply, r in zip(replies, ranked, strict=True)]

    async def ask(question: str) -> None:
        await answer_all([question])

    async def batched(n: int) -> list[float]:
        samples = []
        for start in range(0, n, CONCURRENCY):
            group = [QUESTIONS[i % len(QUESTIONS)] for i in range(start, start + CONCURRENCY)]
            started = time.perf_counter()
            await answer_all(group)
            samples += [time.perf_counter() - started] * len(group)
        return samples

    async def routing_hits(tickets: list[dict]) -> list[bool]:
        classifier = servers["classifier"]
        labels = [
            (await classifier.classify(ClassifyRequest(text=t["text"]))).label for t in tickets
        ]
        return [label == t["label"] for label, t in zip(labels, tickets, strict=True)]

    try:
        asyncio.run(ask("warm up"))
        hits = asyncio.run(routing_hits(held_out_tickets()))
        return {
            "rag_c1": percentiles(asyncio.run(latencies(ask, SEQUENTIAL, 1))),
            "rag_c16": percentiles(asyncio.run(batched(CONCURRENT))),
            "classifier_accuracy_same_tickets": sum(hits) / len(hits),
        }
    finally:  # its processes would otherwise share the cores with the platform's run
        llm.close()


def served() -> dict:
    from benchmarks.platform_up import serving_everything

    with serving_everything(dashboard=False) as cluster:

        async def run() -> dict:
            async with httpx.AsyncClient(
                headers=client_headers(), base_url=cluster.base_url, timeout=600
            ) as client:

                async def ask(question: str) -> None:
                    (
                        await client.post(
                            "/pipelines/rag", json={"question": question}, headers=DEADLINE
                        )
                    ).raise_for_status()

                first_chunk: list[float] = []

                async def ask_streamed(question: str) -> None:
                    started, first = time.perf_counter(), None
                    async with client.stream(
                        "POST",
                        "/pipelines/rag/stream",
                        json={"question": question},
                        headers=DEADLINE,
                    ) as response:
                        response.raise_for_status()
                        async for line in response.aiter_lines():
                            if first is None and line == "event: chunk":
                                first = time.perf_counter() - started
                    assert first is not None, "the stream sent no answer text"
                    first_chunk.append(first)

                await ask("warm up")
                out = {
                    "rag_c1": percentiles(await latencies(ask, SEQUENTIAL, 1)),
                    "rag_c16": percentiles(await latencies(ask, CONCURRENT, CONCURRENCY)),
                }
                out["rag_stream_c1_whole"] = percentiles(
                    await latencies(ask_streamed, SEQUENTIAL, 1)
                )
                out["rag_stream_c1_first_chunk"] = percentiles(first_chunk)
                report("serve", out)
                tickets = held_out_tickets()
                semaphore = asyncio.Semaphore(AGENT_CONCURRENCY)

                async def triage(ticket: dict) -> bool | None:
                    async with semaphore:
                        started = time.perf_counter()
                        response = await client.post(
                            "/pipelines/triage",
                            json={"text": ticket["text"]},
                            headers=DEADLINE,
                        )
                        agent_latency.append(time.perf_counter() - started)
                        if response.status_code != 200:
                            print("triage failed:", response.status_code, response.text[:300])
                            return None
                        return response.json()["team"] == ticket["label"]

                agent_latency: list[float] = []
                results = await asyncio.gather(*(triage(t) for t in tickets))
                answered = [hit for hit in results if hit is not None]
                out["agent_routing_accuracy"] = sum(answered) / max(1, len(answered))
                out["agent_tickets"] = len(tickets)
                out["agent_failed"] = len(tickets) - len(answered)
                out["agent_latency_c4"] = percentiles(agent_latency)
                return out

        return asyncio.run(run())


def report(side: str, figures: dict) -> None:
    """Print figures as soon as they exist: a later failure must not lose them."""
    print(f"== {side}: {json.dumps(figures)}", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as index:
        baseline = raw(Path(index))
    report("in-process raw models", baseline)
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
    whole, first = on_serve["rag_stream_c1_whole"], on_serve["rag_stream_c1_first_chunk"]
    print(
        f"rag streamed c1: first answer text after p50 {first['p50_ms']:.0f} ms "
        f"(whole answer p50 {whole['p50_ms']:.0f} ms)"
    )
    print(
        f"agent routing accuracy: {on_serve['agent_routing_accuracy']:.3f} "
        f"on {on_serve['agent_tickets'] - on_serve['agent_failed']} answered of "
        f"{on_serve['agent_tickets']} held-out tickets "
        f"(the classifier alone, in-process, on the same tickets: "
        f"{baseline['classifier_accuracy_same_tickets']:.3f})"
    )


if __name__ == "__main__":
    main()
