"""Each model server against the same model called directly in one process, one run.

    .venv/bin/python -m benchmarks.model_servers

Raw first (no Ray: the models in this process, batched the way a careful caller would),
then the same work through Ray Serve over HTTP at the issue's concurrency: LLM output
tokens/s at 32 concurrent requests, embedder and classifier items/s at 64.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from typing import Any

import httpx

from benchmarks import report
from benchmarks.cpu import measured
from benchmarks.report import Figure
from deployments.classifier.model import TicketClassifier, trained_dir
from deployments.embedder.model import SentenceEncoder
from deployments.llm.settings import LLMSettings
from servegraph._serve_status import serve_state
from servegraph.security.client import client_headers

ITEMS = 640
IDLE_WINDOW_S = 20.0
LLM_REQUESTS, LLM_TOKENS = 32, 64
TEXTS = [
    f"My order {10000 + i} has not arrived and tracking shows nothing, please help."
    for i in range(ITEMS)
]
PROMPTS = [
    f"Write a short note to customer number {i} about their delivery." for i in range(LLM_REQUESTS)
]


def raw_embedder() -> float:
    encoder = SentenceEncoder()
    encoder.encode(TEXTS[:64])
    started = time.perf_counter()
    for i in range(0, ITEMS, 64):
        encoder.encode(TEXTS[i : i + 64])
    return ITEMS / (time.perf_counter() - started)


def raw_classifier() -> float:
    classifier = TicketClassifier(trained_dir(), SentenceEncoder())
    classifier.classify(TEXTS[:64])
    started = time.perf_counter()
    for i in range(0, ITEMS, 64):
        classifier.classify(TEXTS[i : i + 64])
    return ITEMS / (time.perf_counter() - started)


def raw_llm(settings: LLMSettings) -> tuple[float, float]:
    """Output tokens/s for 32 prompts x 64 tokens, and the engine's cold start."""
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    started = time.perf_counter()
    llm = LLM(
        model=settings.path,
        dtype=settings.dtype,
        enforce_eager=True,
        max_model_len=settings.max_model_len,
        max_num_seqs=64,
    )
    cold_start = time.perf_counter() - started
    params = SamplingParams(max_tokens=LLM_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    rate = tokens / (time.perf_counter() - started)
    # Stop the engine's processes: left idle they poll, and would take CPU from the
    # platform's measurements that follow.
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return rate, cold_start


async def _http_items(base_url: str, path: str, key: str, concurrency: int) -> float:
    async with httpx.AsyncClient(
        headers=client_headers(),
        base_url=base_url,
        timeout=300,
        limits=httpx.Limits(max_connections=concurrency),
    ) as client:
        queue = list(TEXTS)

        async def worker() -> None:
            while queue:
                (await client.post(path, json={key: queue.pop()})).raise_for_status()

        await asyncio.gather(*(client.post(path, json={key: t}) for t in TEXTS[:concurrency]))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ITEMS / (time.perf_counter() - started)


async def _handle_items(handle: Any, method: str, request: Any, concurrency: int) -> float:
    """The same load through a `DeploymentHandle`: how a pipeline calls the server."""
    queue = list(TEXTS)

    async def worker() -> None:
        while queue:
            await getattr(handle, method).remote(request(text=queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ITEMS / (time.perf_counter() - started)


async def _http_llm(base_url: str) -> float:
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=600
    ) as client:

        async def one(prompt: str) -> int:
            response = await client.post(
                "/v1/completions",
                json={
                    "model": LLMSettings().model_id,
                    "prompt": prompt,
                    "max_tokens": LLM_TOKENS,
                    "temperature": 0.0,
                    "ignore_eos": True,
                },
            )
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(one(p) for p in PROMPTS[:2]))
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in PROMPTS)))
        return tokens / (time.perf_counter() - started)


def on_serve() -> dict[str, float]:
    from ray import serve

    from deployments.catalog import CATALOG
    from servegraph.deploy.local_ray import local_cluster
    from servegraph.deploy.planner import plan_platform

    with local_cluster(dashboard=False) as cluster:
        started = time.perf_counter()
        plan_platform([], CATALOG, all_servers=True).deploy()
        while serve_state().applications["llm"].status != "RUNNING":
            time.sleep(1)
        deploy_s = time.perf_counter() - started
        served: dict[str, float] = {"deploy_all_s": deploy_s}
        from deployments.classifier.contract import ClassifyRequest
        from deployments.embedder.contract import EmbedOneRequest

        for name, deployment, method, request in (
            ("embedder", "Embedder", "embed_one", EmbedOneRequest),
            ("classifier", "Classifier", "classify", ClassifyRequest),
        ):
            handle = serve.get_deployment_handle(deployment, name)
            before = handle.batch_stats.remote().result()
            route = f"/{name}/{method}"
            served[name] = asyncio.run(_http_items(cluster.base_url, route, "text", 64))
            after = handle.batch_stats.remote().result()
            served[f"{name}_batch_median"], served[f"{name}_batch_median_item"] = (
                after.median_since(before)
            )
            served[f"{name}_handle"] = asyncio.run(_handle_items(handle, method, request, 64))
        # Which processes spend the CPU the engine does not get (on 2 cores every other
        # process's CPU comes out of the engine's): the platform at rest, then while the
        # LLM generates. This process is the client.
        with measured(clients={os.getpid()}) as idle:
            time.sleep(IDLE_WINDOW_S)  # a window to measure, not a wait for a condition
        with measured(clients={os.getpid()}) as generating:
            served["llm"] = asyncio.run(_http_llm(cluster.base_url))
        for title, window in (("at rest", idle[0]), ("LLM at 32 concurrent", generating[0])):
            print(f"CPU by process, platform {title}, over {window.seconds:.0f} s:", flush=True)
            for row in window.rows():
                print(f"  {row}", flush=True)
        return served


def main() -> None:
    raw = {"embedder": raw_embedder(), "classifier": raw_classifier()}
    raw["llm"], raw["llm_cold_start_s"] = raw_llm(LLMSettings())
    served = on_serve()
    print(json.dumps({"raw": raw, "serve": served}, indent=2))
    figures = [
        Figure(
            "LLM tok/s at 32 concurrent, platform / raw",
            served["llm"],
            raw["llm"],
            "tok/s",
            ">= 0.95",
        ),
    ]
    for name in ("embedder", "classifier"):
        figures += [
            Figure(
                f"{name} items/s, 64 concurrent over HTTP, platform / raw",
                served[name],
                raw[name],
                "items/s",
                ">= 0.8",
            ),
            Figure(
                f"{name} items/s, 64 concurrent via handles, platform / raw",
                served[f"{name}_handle"],
                raw[name],
                "items/s",
                ">= 0.8",
            ),
            Figure(
                f"{name} median batch at 64 concurrent over HTTP (per batch)",
                served[f"{name}_batch_median"],
                None,
                "items",
                ">= 16",
            ),
            Figure(
                f"{name} median batch at 64 concurrent over HTTP (per item)",
                served[f"{name}_batch_median_item"],
                None,
                "items",
                ">= 16",
            ),
        ]
    report.save("model_servers", figures)


if __name__ == "__main__":
    main()
