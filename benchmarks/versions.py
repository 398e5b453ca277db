"""Versions of a pipeline side by side (issue 28), on the real platform over HTTP with
two ingress replicas, in one run:

1. **split**: weights 90/10 over 2,000 requests from 50 callers (sessions), sticky and
   drawn per request: the share of callers (sticky) and of requests (drawn) on v2,
   against the binomial 99 % interval, and whether each sticky caller stayed on one
   version;
2. **weight change** under 20 concurrent callers: from the change's acknowledgement to
   the last request the old version still answered; failed requests;
3. **shadow at 100 %**: `rag` at a fixed open-loop rate, without and then with every
   request shadowed on v2 (the shipped candidate, `pipelines/rag/v2.py`: the shadow
   doubles the model servers' work): the primary's p50/p99 both ways, and the CPU by
   process;
4. **rollouts** to three worse candidates (`benchmarks.rollout`): an injected fault, a
   version twice as slow, and `rag` with worse answers; at which step each rolled back
   and on which gate.

Each figure comes with the load generator's own CPU. The probe pipeline of 1 and 2 is
one embedder call, so the callers, not the LLM, set their pace.

    .venv/bin/python -m benchmarks.versions [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks import cpu, report
from benchmarks.load import UNCACHED
from servegraph.security.client import client_headers

PROBE = {
    "name": "versions_probe",
    "description": "One embedder call, served at two versions (benchmarks.versions, "
    "tests/integration/test_ingress_replicas.py): cheap enough that many callers cost "
    "this machine little.",
    "input": "pipelines.rag.models:RagQuery",
    "output": "deployments.embedder.contract:Embedding",
    "nodes": [
        {
            "kind": "call",
            "name": "embed",
            "inputs": {"text": "input.question"},
            "server": "embedder",
            "method": "embed_one",
        }
    ],
    "returns": "embed",
}
QUESTIONS = [
    "How long do refunds take after a return?",
    "How long is the reset link for a password valid?",
    "How do I track my parcel?",
    "Can I exchange a product for another size?",
]


def probe(version: str) -> str:
    """The probe pipeline at `version`, as YAML."""
    return yaml.safe_dump({**PROBE, "version": version})


def graphs() -> list[Any]:
    """Every shipped pipeline at every version (`rag` at v1 and v2), and the probe at v1
    and v2."""
    from servegraph.lang.discovery import discover_versions
    from servegraph.lang.serialize import from_yaml

    shipped = [g for versions in discover_versions("pipelines").values() for g in versions.values()]
    return [*shipped, *(from_yaml(probe(v)) for v in ("v1", "v2"))]


async def split_shares(base_url: str, sticky: bool) -> dict[str, Any]:
    """2,000 requests from 50 sessions under a 90/10 split. Sticky, each session keeps
    one version, so the share of *sessions* is what the weights set (binomial over 50);
    not sticky, each request draws (binomial over 2,000)."""
    route = "/pipelines/versions_probe"
    async with httpx.AsyncClient(base_url=base_url, headers=client_headers(), timeout=60) as c:
        split = {"weights": {"v1": 90, "v2": 10}, "sticky": sticky}
        moved = await c.put(f"{route}/traffic", json=split)
        moved.raise_for_status()
        await asyncio.sleep(1.5)  # both replicas have read the board (every 0.5 s)
        rng = random.Random(28)
        sessions = [f"session-{n}" for n in range(50)]
        picks = [rng.choice(sessions) for _ in range(2_000)]
        seen: dict[str, set[str]] = {s: set() for s in sessions}
        limit = asyncio.Semaphore(20)

        async def one(session: str, n: int) -> str:
            async with limit:
                answer = await c.post(
                    route,
                    json={"question": f"question {n}"},
                    headers={"x-session-id": session},
                )
                answer.raise_for_status()
                version = answer.headers["x-pipeline-version"]
                seen[session].add(version)
                return version

        versions = await asyncio.gather(*(one(s, n) for n, s in enumerate(picks)))
    return {
        "sticky": sticky,
        "requests": len(versions),
        "requests_on_v2": versions.count("v2"),
        "requests_interval_99": _binomial_99(len(versions), 0.1),
        "callers_on_v2": sum(v == {"v2"} for v in seen.values()),
        "callers_interval_99": _binomial_99(len(sessions), 0.1),
        "callers_on_two_versions": sum(len(v) > 1 for v in seen.values()),
    }


def _binomial_99(n: int, p: float) -> tuple[float, float]:
    half = 2.576 * math.sqrt(n * p * (1 - p))
    return (n * p - half, n * p + half)


async def _until_every_replica(client: httpx.AsyncClient, route: str, version: str) -> None:
    """Requests until 40 in a row are answered by `version` (bounded): the change has
    reached both replicas (each reads the board every 0.5 s)."""
    row, deadline = 0, time.monotonic() + 30
    while row < 40 and time.monotonic() < deadline:
        answer = await client.post(route, json={"question": "which version?"})
        row = row + 1 if answer.headers.get("x-pipeline-version") == version else 0
    if row < 40:
        raise RuntimeError(f"the split did not reach every replica ({version})")


async def weight_change(base_url: str) -> dict[str, Any]:
    route = "/pipelines/versions_probe"
    answers: list[tuple[float, int, str]] = []  # (sent, status, version)
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, headers=client_headers(), timeout=60) as c:
        await c.put(f"{route}/traffic", json={"weights": {"v1": 100, "v2": 0}})
        await _until_every_replica(c, route, "v1")

        async def caller(k: int) -> None:
            n = 0
            while not stop.is_set() and n < 5_000:
                sent = time.monotonic()
                try:
                    answer = await c.post(route, json={"question": f"caller {k} asks {n}"})
                    version = answer.headers.get("x-pipeline-version", "")
                    answers.append((sent, answer.status_code, version))
                except httpx.HTTPError:
                    answers.append((sent, 0, ""))
                n += 1

        callers = [asyncio.create_task(caller(k)) for k in range(20)]
        await asyncio.sleep(5)  # the callers at their pace before the change
        moved = await c.put(f"{route}/traffic", json={"weights": {"v1": 0, "v2": 100}})
        acknowledged = time.monotonic()
        await asyncio.sleep(10)
        stop.set()
        await asyncio.gather(*callers)
    late = [sent - acknowledged for sent, _, v in answers if v == "v1" and sent > acknowledged]
    after = [a for a in answers if a[0] > acknowledged]
    return {
        "status": moved.status_code,
        "requests": len(answers),
        "failed": sum(status != 200 for _, status, _ in answers),
        "requests_per_s": len(answers) / 15,
        "last_old_version_sent_after_s": max(late, default=0.0),
        "old_version_answers_after": len(late),
        "answers_after": len(after),
    }


async def open_loop(
    base_url: str, rate: float, seconds: float, seed: int
) -> list[tuple[int, float, str]]:
    """`rag` requests at Poisson arrivals of `rate`/s for `seconds`: (status, s, version)."""
    rng = random.Random(seed)
    out: list[tuple[int, float, str]] = []
    async with httpx.AsyncClient(base_url=base_url, headers=client_headers(), timeout=120) as c:

        async def one(n: int) -> None:
            started = time.monotonic()
            body = {"question": QUESTIONS[n % len(QUESTIONS)], "max_tokens": 48}
            # each version's own answers, not the answer cache's
            headers = {"x-request-timeout": "60", **UNCACHED}
            answer = await c.post("/pipelines/rag", json=body, headers=headers)
            version = answer.headers.get("x-pipeline-version", "")
            out.append((answer.status_code, time.monotonic() - started, version))

        tasks, at, n = [], 0.0, 0
        began = time.monotonic()
        while at < seconds:
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def shadow_cost(base_url: str, rate: float, seconds: float) -> dict[str, Any]:
    me = {os.getpid()}
    phases: dict[str, Any] = {}
    with httpx.Client(base_url=base_url, headers=client_headers(), timeout=60) as c:
        for phase, split in (
            ("alone", {"weights": {"v1": 100}}),
            ("shadowed", {"weights": {"v1": 100}, "shadow": "v2", "shadow_percent": 100}),
        ):
            c.put("/pipelines/rag/traffic", json=split).raise_for_status()
            time.sleep(1.5)  # both replicas have read the board (every 0.5 s)
            with cpu.measured(clients=me) as used:
                answers = asyncio.run(open_loop(base_url, rate, seconds, seed=28))
            ok = [s for status, s, _ in answers if status == 200]
            phases[phase] = {
                "requests": len(answers),
                "ok": len(ok),
                "statuses": sorted({status for status, _, _ in answers}),
                "versions": sorted({v for _, _, v in answers}),
                "p50_s": statistics.median(ok) if ok else float("nan"),
                "p99_s": _pct(ok, 0.99),
                "cpu": used[0].rows(),
                "client_cpu_s": used[0].cpu_s.get("client", 0.0),
            }
            print(f"rag {phase}: {json.dumps(phases[phase], indent=1)}", flush=True)
        shadows = c.get("/pipelines/rag/shadow").json()
        c.delete("/pipelines/rag/traffic")
    phases["shadow_records_on_one_replica"] = len(shadows["recent"])
    agreements = [r["agreement"] for r in shadows["recent"] if r["agreement"] is not None]
    phases["agreement_mean"] = statistics.mean(agreements) if agreements else None
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=0.4, help="rag requests/s in part 3")
    parser.add_argument("--seconds", type=float, default=90, help="each phase of part 3")
    args = parser.parse_args()

    from benchmarks.rollout import platform_with_candidates, prometheus_on_the_cluster, rollouts

    results: dict[str, Any] = {}
    with platform_with_candidates() as cluster:
        me = {os.getpid()}
        for name, sticky in (("split", True), ("split_drawn", False)):
            with cpu.measured(clients=me) as used:
                results[name] = asyncio.run(split_shares(cluster.base_url, sticky))
            results[name]["client_cpu_s"] = used[0].cpu_s.get("client", 0.0)
            print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
        with cpu.measured(clients=me) as used:
            results["weight_change"] = asyncio.run(weight_change(cluster.base_url))
        results["weight_change"]["client_cpu_s"] = used[0].cpu_s.get("client", 0.0)
        results["weight_change"]["cpu"] = used[0].rows()
        print(f"weight change: {json.dumps(results['weight_change'], indent=1)}", flush=True)
        results["shadow"] = shadow_cost(cluster.base_url, args.rate, args.seconds)
        with prometheus_on_the_cluster() as prometheus_url:
            results["rollouts"] = rollouts(cluster.base_url, prometheus_url)
    results["machine"] = {"cpus": psutil.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    split, change, shadow = results["split"], results["weight_change"], results["shadow"]
    drawn = results["split_drawn"]
    low, high = drawn["requests_interval_99"]
    callers_high = split["callers_interval_99"][1]
    alone, shadowed = shadow["alone"], shadow["shadowed"]
    report.save(
        "versions",
        [
            report.Figure(
                "90/10 split, each request drawn: requests on v2 of 2,000",
                drawn["requests_on_v2"],
                None,
                "requests",
                f"in {low:.0f}..{high:.0f} (binomial 99 %)",
            ),
            report.Figure(
                "90/10 split, sticky: callers on v2 of 50",
                split["callers_on_v2"],
                None,
                "callers",
                f"<= {callers_high:.1f}",
                higher_is_better=False,
            ),
            report.Figure(
                "callers on two versions", split["callers_on_two_versions"], None, "", "<= 0"
            ),
            report.Figure(
                "weight change: last old-version request sent after the change",
                change["last_old_version_sent_after_s"],
                None,
                "s",
                "<= 2",
                higher_is_better=False,
            ),
            report.Figure(
                "weight change: failed requests", change["failed"], None, "", "<= 0", False
            ),
            *(
                report.Figure(
                    f"rollout to a candidate with {what}: rolled back at (percent)",
                    results["rollouts"][name]["rolled_back_at_percent"] or 100,
                    None,
                    "%",
                    f"<= {limit}",
                    higher_is_better=False,
                )
                for name, what, limit in (
                    ("fault", "a node failing 20 % of calls", 1),
                    ("slower", "twice the model work", 1),
                    ("worse_answers", "worse answers (no sources in the prompt)", 25),
                )
            ),
            report.Figure(
                "shadow at 100 %: rag primary p99, shadowed / alone",
                shadowed["p99_s"],
                alone["p99_s"],
                "s",
                "<= 1.1",
                higher_is_better=False,
            ),
        ],
    )


if __name__ == "__main__":
    main()
