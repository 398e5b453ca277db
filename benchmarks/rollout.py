"""Rollouts on the real platform (issue 28; part 4 of `benchmarks.versions`, or alone):
`servegraph.serving.rollout`'s driver, with the figures from a real Prometheus, moving
traffic from v1 to a candidate that is worse in one way, under load:

- `versions_probe` v3: an injected fault, a node that fails 20 % of calls;
- `versions_probe` v4: twice the model work (it embeds, then embeds again), about
  twice as slow;
- `rag` v3: its sources left out of the prompt (a template slip: the LLM answers from
  its own weights), gated on the answer signal `generated` (the share of answers whose
  generated text the evidence check kept) and on errors.

Each rollout should roll back at its first gated step naming the gate; the figures say
at which step, which gates failed, both versions' values, and how long it took. The
probe's load is 20 closed-loop callers, each request a new session (so the split
applies per request); rag's is an open loop of Poisson arrivals. With the load
generator's own CPU.

    .venv/bin/python -m benchmarks.rollout [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks import cpu
from benchmarks.load import UNCACHED
from benchmarks.versions import PROBE, QUESTIONS
from deployments.embedder.contract import Embedding
from pipelines.rag.models import Ranked
from servegraph.security.client import client_headers

FAULT_SHARE = 0.2


def failing(embedding: Embedding, share: float = FAULT_SHARE) -> Embedding:
    """The embedding as it came, except for `share` of calls: an injected fault."""
    if random.random() < share:
        raise RuntimeError("injected fault (benchmarks.rollout.failing)")
    return embedding


def after(first: Embedding, text: str) -> str:
    """`text`, once `first` is there: puts a second embedder call after the first."""
    return text


def without_sources(question: str, ranked: Ranked, max_tokens: int = 160) -> dict:
    """rag's prompt with its sources left out (a template slip): the LLM answers from its
    own weights, still asked for JSON citing the passages' numbers."""
    from pipelines.rag.qa import build_prompt

    prompt = build_prompt(question, ranked, max_tokens)
    prompt["messages"][-1] = {"role": "user", "content": f"Question: {question}"}
    return prompt


def faulty_probe() -> Any:
    """`versions_probe` v3: its embedding passed through a node failing 20 % of calls."""
    from servegraph.lang.serialize import from_yaml

    embed = PROBE["nodes"][0]
    fault = {
        "kind": "function",
        "name": "fault",
        "inputs": {"embedding": "embed"},
        "function": "benchmarks.rollout:failing",
    }
    return from_yaml(
        yaml.safe_dump({**PROBE, "version": "v3", "nodes": [embed, fault], "returns": "fault"})
    )


def slower_probe() -> Any:
    """`versions_probe` v4: it embeds, then embeds again (twice the model work)."""
    from servegraph.lang.serialize import from_yaml

    embed = PROBE["nodes"][0]
    then = {
        "kind": "function",
        "name": "then",
        "inputs": {"first": "embed", "text": "input.question"},
        "function": "benchmarks.rollout:after",
    }
    again = {**embed, "name": "embed_again", "inputs": {"text": "then"}}
    nodes = [embed, then, again]
    return from_yaml(
        yaml.safe_dump({**PROBE, "version": "v4", "nodes": nodes, "returns": "embed_again"})
    )


def rag_with(version: str, node: str, function: str) -> Any:
    """`rag` at `version`, its `node` running `function` instead."""
    from pipelines.rag.qa import build_pipeline

    rag = build_pipeline(version=version).build()
    nodes = [
        n.model_copy(update={"function": function}) if n.name == node else n for n in rag.nodes
    ]
    return rag.model_copy(update={"nodes": nodes})


def candidates() -> list[Any]:
    """The worse candidates' graphs: the probe with a fault (v3) and twice as slow (v4);
    `rag` without its sources in the prompt (v3)."""
    return [
        faulty_probe(),
        slower_probe(),
        rag_with("v3", "prompt", "benchmarks.rollout:without_sources"),
    ]


Statuses = dict[str, int]  # "<version> <status>" -> answers


def _count(statuses: Statuses, answer: httpx.Response) -> None:
    key = f"{answer.headers.get('x-pipeline-version', '?')} {answer.status_code}"
    statuses[key] = statuses.get(key, 0) + 1


@contextmanager
def _in_background(
    load: Callable[[threading.Event, Statuses], Coroutine[Any, Any, None]], join_s: float
) -> Iterator[Statuses]:
    """Run `load(stop, statuses)` on an event loop of its own thread until the block
    exits; then stop it and wait for its requests (at most `join_s`)."""
    statuses: Statuses = {}
    stop = threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(load(stop, statuses),), daemon=True)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(timeout=join_s)


def probe_load(base_url: str, callers: int = 20) -> AbstractContextManager[Statuses]:
    """`callers` closed-loop callers of the probe (each request a new session) until the
    block exits: the statuses they saw."""

    async def run(stop: threading.Event, statuses: Statuses) -> None:
        async with httpx.AsyncClient(
            base_url=base_url, headers=client_headers(), timeout=60
        ) as client:

            async def caller(k: int) -> None:
                n = 0
                while not stop.is_set() and n < 100_000:
                    answer = await client.post(
                        "/pipelines/versions_probe",
                        json={"question": QUESTIONS[n % len(QUESTIONS)]},
                        headers={"x-session-id": uuid.uuid4().hex},
                    )
                    _count(statuses, answer)
                    n += 1

            await asyncio.gather(*(caller(k) for k in range(callers)))

    return _in_background(run, join_s=120)


def rag_load(base_url: str, rate: float) -> AbstractContextManager[Statuses]:
    """`rag` at Poisson arrivals of `rate`/s (each a new session) until the block exits."""

    async def run(stop: threading.Event, statuses: Statuses) -> None:
        rng = random.Random(28)
        async with httpx.AsyncClient(
            base_url=base_url, headers=client_headers(), timeout=120
        ) as client:

            async def one(n: int) -> None:
                answer = await client.post(
                    "/pipelines/rag",
                    json={"question": QUESTIONS[n % len(QUESTIONS)], "max_tokens": 48},
                    headers={
                        "x-session-id": uuid.uuid4().hex,
                        "x-request-timeout": "60",
                        **UNCACHED,  # each version's own answers, not the cache's
                    },
                )
                _count(statuses, answer)

            tasks, n = [], 0
            while not stop.is_set() and n < 10_000:
                tasks.append(asyncio.create_task(one(n)))
                n += 1
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)

    return _in_background(run, join_s=300)


def roll_out(
    base_url: str,
    prometheus_url: str,
    pipeline: str,
    candidate: str,
    **options: Any,
) -> dict[str, Any]:
    """Drive one rollout from v1 to `candidate` to its end; what it did."""
    from servegraph.serving.rollout import (
        Check,
        Driver,
        HttpTraffic,
        Rollouts,
        RolloutState,
        prometheus_figures,
    )

    traffic = HttpTraffic(base_url, pipeline, client_headers())
    traffic.set({"v1": 100}, True)  # from v1 alone, whatever an earlier part left
    shown = traffic.shown()
    signals = set(shown["signals"].get("v1", [])) & set(shown["signals"].get(candidate, []))
    interval_s = options.pop("interval_s", 10.0)
    state = RolloutState(pipeline=pipeline, current="v1", candidate=candidate, **options)
    checks: list[Check] = []

    def say(event: Any) -> None:
        if isinstance(event, Check):
            checks.append(event)
            verdicts = ", ".join(
                f"{v.gate} {v.candidate if v.candidate is None else round(v.candidate, 4)}"
                f"/{v.current if v.current is None else round(v.current, 4)} {v.passed}"
                for v in event.verdicts
            )
            print(
                f"  {pipeline} {candidate} at {event.step.percent} %, {event.held_s:.0f} s: "
                f"requests {event.step.requests}; {verdicts}",
                flush=True,
            )

    with tempfile.TemporaryDirectory(prefix="sg-rollout-") as home:
        began = time.monotonic()
        final = Driver(
            state,
            Rollouts(Path(home)),
            traffic,
            prometheus_figures(prometheus_url),
            signals,
            interval_s=interval_s,
            say=say,
        ).run()
        took = time.monotonic() - began
    failed_step = next((s for s in final.history if s.outcome == "failed"), None)
    return {
        "pipeline": pipeline,
        "candidate": candidate,
        "status": final.status,
        "reason": final.reason,
        "steps": final.steps,
        "rolled_back_at_percent": failed_step.percent if failed_step else None,
        "first_gated_step": final.steps[0],
        "failed_gates": [v.gate for v in failed_step.verdicts if v.passed is False]
        if failed_step
        else [],
        "verdicts": [v.model_dump() for v in failed_step.verdicts] if failed_step else [],
        "requests": failed_step.requests if failed_step else {},
        "held_s": (failed_step.ended or 0) - failed_step.started if failed_step else None,
        "seconds": took,
        "split_after": traffic.weights(),
        "checks": len(checks),
    }


def rollouts(
    base_url: str, prometheus_url: str, rag_rate: float = 0.5, rag_hold_s: float = 240
) -> dict[str, Any]:
    """The three rollouts, one after the other, each under its load."""
    me = {os.getpid()}
    results: dict[str, Any] = {}
    probe_options = {
        "steps": [1, 5, 25, 50, 100],
        "hold_s": 60,
        "max_hold_s": 180,
        "gates": ["p99<=1.25x", "errors<=+0.01", "deadline_misses<=+0.01", "cost<=1.25x"],
        "min_requests": 20,
    }
    for name, candidate in (("fault", "v3"), ("slower", "v4")):
        with cpu.measured(clients=me) as used, probe_load(base_url) as statuses:
            time.sleep(5)  # the callers at their pace first
            results[name] = roll_out(
                base_url, prometheus_url, "versions_probe", candidate, **probe_options
            )
        results[name] |= {
            "statuses": statuses,
            "client_cpu_s": used[0].cpu_s.get("client", 0.0),
            "cpu": used[0].rows(),
        }
        print(f"rollout {name}: {json.dumps(results[name], indent=1)}", flush=True)
    rag_options = {
        "steps": [10, 25, 50, 100],
        "hold_s": rag_hold_s,
        "max_hold_s": 2 * rag_hold_s,
        "gates": ["generated>=0.8x", "errors<=+0.05"],
        "min_requests": 8,
    }
    with cpu.measured(clients=me) as used, rag_load(base_url, rag_rate) as statuses:
        time.sleep(10)
        results["worse_answers"] = roll_out(base_url, prometheus_url, "rag", "v3", **rag_options)
    results["worse_answers"] |= {
        "statuses": statuses,
        "client_cpu_s": used[0].cpu_s.get("client", 0.0),
        "cpu": used[0].rows(),
    }
    print(f"rollout worse_answers: {json.dumps(results['worse_answers'], indent=1)}", flush=True)
    return results


@contextmanager
def prometheus_on_the_cluster() -> Iterator[str]:
    """A real Prometheus scraping this process's local Ray node. Ray's own service
    discovery file is written by its dashboard, which a benchmark's cluster may not
    run: the node's metrics port is written into a file of our own instead."""
    import ray

    from servegraph.deploy.local_ray import free_port
    from servegraph.telemetry.observe import prometheus

    port = ray._private.worker._global_node.metrics_export_port
    with tempfile.TemporaryDirectory(prefix="sg-prometheus-sd-") as folder:
        discovery = Path(folder) / "targets.json"
        discovery.write_text(
            json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{port}"]}])
        )
        with prometheus(port=free_port(), rules=None, service_discovery=discovery) as prom:
            deadline = time.monotonic() + 120
            while not any(t["health"] == "up" for t in prom.targets()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Prometheus cannot scrape {port}: {prom.targets()}")
                time.sleep(1)
            yield prom.url


@contextmanager
def platform_with_candidates() -> Iterator[Any]:
    """A local platform for `benchmarks.versions` and this: every shipped pipeline at every
    version, the probe at v1 and v2, the worse candidates; two ingress replicas; the
    knowledge base ingested. Yields the `LocalCluster`."""
    from benchmarks.versions import graphs
    from deployments.catalog import CATALOG
    from pipelines.rag.ingest import on_deploy
    from servegraph.deploy.local_ray import local_cluster, wait_until_running
    from servegraph.deploy.planner import plan_platform

    with local_cluster(dashboard=False) as cluster:
        plan = plan_platform(
            [*graphs(), *candidates()],
            CATALOG,
            all_servers=True,
            ingress_deployment={"num_replicas": 2},
        )
        plan.deploy()
        wait_until_running([app.name for app in plan.apps], timeout_s=900)
        on_deploy(cluster.base_url)
        yield cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rag-rate", type=float, default=0.5)
    parser.add_argument("--rag-hold", type=float, default=240)
    args = parser.parse_args()
    with platform_with_candidates() as cluster, prometheus_on_the_cluster() as prometheus_url:
        results = rollouts(cluster.base_url, prometheus_url, args.rag_rate, args.rag_hold)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
