"""Batch against online, one run (issue 15): the same `rag` questions through
`servegraph batch` (Ray Data actors running the graph against the model servers) and
through the online route at several concurrencies, rows per second side by side.

Then the batch's two model stages against the raw models on the same inputs, after the
platform is down (so each has the machine alone): the LLM's output tokens/s in the
batch against vLLM's offline engine (`LLM.chat`, as `InProcessLLM` drives it) on the
exact requests the batch's `generate` nodes sent (the rag graph run up to `prompt` on
the deployed encoders and index), and the texts the batch embedded per second against
the raw encoder over the same texts in batches of 64.

    .venv/bin/python -m benchmarks.batch [rows]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from benchmarks import report
from benchmarks.load import UNCACHED
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
        headers=UNCACHED,  # the batch runs every row's graph: so does the online route here
    )
    seconds = time.monotonic() - started
    ok = sum(a.status == 200 for a in answers)
    print(f"online @{concurrency}: {ok}/{len(answers)} ok, {ok / seconds:.2f} rows/s")
    return ok / seconds


class Prepared(BaseModel):
    """What rag's nodes before `generate` made of one question."""

    prompt: dict
    texts: list[str]  # the sentences `embed_sentences` embedded


async def prepare(rows: list[dict]) -> list[Prepared]:
    """Each row's LLM prompt and embedded sentences, as the batch's graph made them: the
    rag graph up to its `prompt` node, on the deployed encoders and index."""
    from deployments.catalog import CATALOG
    from servegraph.engine.runtime import Runtime
    from servegraph.lang.discovery import discover
    from servegraph.serving.handles import ServeInvoker

    graph = discover("pipelines")["rag"]
    names = [node.name for node in graph.nodes]
    upto = graph.model_copy(
        update={
            "name": "rag_upto_prompt",
            "nodes": graph.nodes[: names.index("prompt") + 1],
            "output": "benchmarks.batch:Prepared",
            "returns": {"prompt": "prompt", "texts": "split.texts"},
        }
    )
    runtime = Runtime(CATALOG, ServeInvoker(CATALOG))
    compiled = runtime.compile(upto)
    gate = asyncio.Semaphore(16)

    async def one(row: dict) -> Prepared:
        async with gate:
            body = {k: v for k, v in row.items() if k != "id"}
            return await runtime.run(compiled, body)

    return list(await asyncio.gather(*(one(r) for r in rows)))


def raw_llm_tokens_per_s(requests: list) -> float:
    """vLLM's offline engine on `requests` (ChatRequest), all in one engine call."""
    from deployments.llm.in_process import InProcessLLM

    llm = InProcessLLM()
    try:
        asyncio.run(llm.chat_many(requests[:4]))  # warm-up: compile the grammars' paths
        started = time.perf_counter()
        replies = asyncio.run(llm.chat_many(requests))
        seconds = time.perf_counter() - started
    finally:
        llm.close()
    tokens = sum(r.usage.output_tokens for r in replies)
    print(f"raw LLM.chat: {len(replies)} replies, {tokens} tokens, {tokens / seconds:.1f} tok/s")
    return tokens / seconds


def raw_embedder_items_per_s(texts: list[str]) -> float:
    from deployments.embedder.model import SentenceEncoder

    encoder = SentenceEncoder()
    encoder.encode(texts[:64])
    started = time.perf_counter()
    for i in range(0, len(texts), 64):
        encoder.encode(texts[i : i + 64])
    rate = len(texts) / (time.perf_counter() - started)
    print(f"raw encoder: {len(texts)} texts in batches of 64, {rate:.1f} items/s")
    return rate


def main(n: int) -> None:
    from deployments.llm.contract import ChatRequest
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
        prepared = asyncio.run(prepare(rows))
    written = [json.loads(t) for t in (folder / "out.jsonl").read_text().splitlines()]
    ok = [w for w in written if "output" in w]
    batch_tokens = sum(w["usage"]["llm_output_tokens"] for w in ok)
    texts = [r["question"] for r in rows] + [t for p in prepared for t in p.texts]
    requests = [
        ChatRequest(
            messages=p.prompt["messages"],
            json_schema=p.prompt["schema"],
            max_tokens=r["max_tokens"],
        )
        for p, r in zip(prepared, rows, strict=True)
    ]
    raw_tokens = raw_llm_tokens_per_s(requests)
    raw_items = raw_embedder_items_per_s(texts)
    print(
        f"batch: {batch_tokens} LLM tokens, {batch_tokens / result.seconds:.1f} tok/s; "
        f"{len(texts)} texts embedded, {len(texts) / result.seconds:.1f} items/s"
    )
    report.save(
        "batch",
        [
            report.Figure(
                "batch vs online at its best concurrency, rag rows/s",
                len(ok) / result.seconds,
                best,
                "rows/s",
                ">= 2",
            ),
            report.Figure(
                "batch rag: LLM tok/s vs LLM.chat offline, same requests",
                batch_tokens / result.seconds,
                raw_tokens,
                "tok/s",
                ">= 0.8",
            ),
            report.Figure(
                "batch rag: texts embedded/s vs the raw encoder batched, same texts",
                len(texts) / result.seconds,
                raw_items,
                "items/s",
                ">= 0.8",
            ),
        ],
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
