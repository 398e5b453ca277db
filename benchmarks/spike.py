"""The spike benchmark (issue 25): what callers see when traffic steps up tenfold, and
what capacity costs, under three ways of scaling the model servers.

A mix of `rag` and `triage` arrives open-loop (Poisson, seeded) at a base rate; at
`--step-at` seconds it steps to `--step` times that, held for `--hold` seconds, then
returns. The platform runs on a simulated cluster shaped like `cluster.yaml` (a head
and GPU workers, logical GPUs) with the GPU profile's placement and simulated models
(`servegraph.deploy.simulated`, curves measured here by `benchmarks.calibrate`): every
deployment, batcher, handle, retry and autoscaler is real, only the forward passes
and model loads are waits. Policies:

- `default`: Serve's default policy (10 s metric pushes, 30 s upscale delay) with only
  the bounds and `target_ongoing_requests` set, as every server shipped before graph-aware
  scaling (the bounds are the benchmark's, for all three policies: the LLM from 1 to 4);
- `tuned`: the best reactive per-deployment settings found (0.5 s metric pushes, no
  upscale delay, a 2 s look-back, a lower LLM target);
- `graph`: graph-aware (`servegraph.deploy.scaling`): every server sized from the pipelines'
  arrivals in the same tick.

    .venv/bin/python -m benchmarks.spike --policy graph --seed 1 --step 10 --json out.json

The JSON has `servers` (per server: `first_decision_s`, `capacity_ready_s` after the
step), `pipelines` (per pipeline: `p99_steady_s`, `p99_spike_s`, `requests`,
`deadline_misses`, `shed`), `replica_seconds` and `oracle_replica_seconds`; a PNG of
arrivals, replicas per server and p99 over time is written beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from servegraph.deploy.simulated import Curves

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "benchmarks" / "curves" / "cpu.json"
DEADLINE_S = 30.0
UTILISATION = 0.7
# The scaled servers: (app, deployment prefix, min, max). The GPU profile's minimums;
# maximums that the simulated cluster's logical GPUs hold.
SERVERS = {
    "embedder": ("embedder", "Embedder", 2, 6),
    "classifier": ("classifier", "Classifier", 2, 4),
    "llm": ("llm", "LLMServer", 1, 4),
}
# Requests per second before the step: with the CPU curves, the LLM needs one replica
# at the base rate and its maximum of four at ten times it.
BASE_RATES = {"rag": 0.15, "triage": 0.08}
LLM_TARGET_RUNNING = 16  # sequences a replica runs at its target utilisation
ENCODER_ITEMS_PER_CALL = 4  # a pipeline's encoder call carries 1 (a question) to ~20
# (a passage's sentences) texts: an estimate, until replicas report their busy time


def service_times(curves: Curves) -> dict[str, float]:
    """A call's replica-seconds at full load, from the curves: an encoder call's texts
    at the largest measured batch's cost per item; an LLM call's prefill (a ~300-token
    prompt) and reply, sharing each decode step with the sequences running at target."""
    assert curves.encoder is not None and curves.llm is not None
    largest = max(curves.encoder.batch_s)
    per_item = curves.encoder.batch_s[largest] / largest
    llm = curves.llm
    step = llm.step(LLM_TARGET_RUNNING)
    llm_call = 300 * llm.prefill_s_per_token + llm.reply_tokens * step / LLM_TARGET_RUNNING
    return {
        "embedder": ENCODER_ITEMS_PER_CALL * per_item,
        "classifier": per_item,
        "llm": llm_call,
    }


def autoscaling(
    policy: str, server: str, service_time_s: float, llm_spare: int = 0
) -> dict[str, Any]:
    from servegraph.deploy.scaling.settings import graph_autoscaling

    _, _, low, high = SERVERS[server]
    target = 8 if server == "llm" else 32
    bounds = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}
    if policy == "default":
        return bounds
    if policy == "tuned":
        return bounds | {
            "target_ongoing_requests": 4 if server == "llm" else 16,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 30.0,
            "look_back_period_s": 2.0,
        }
    spare = {"spare_replicas": llm_spare} if server == "llm" and llm_spare else {}
    return graph_autoscaling(server, service_time_s=service_time_s, **bounds, **spare)


TUNED_ENV = {  # Serve's metric pushes every 0.5 s instead of 10 (replicas and handles)
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


@dataclass
class Sent:
    pipeline: str
    at: float  # seconds after the run's start, as scheduled
    seconds: float = math.nan
    status: int = 0


@dataclass
class Sample:
    at: float
    target: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)


def arrivals(seed: int, step: float, step_at: float, hold: float, after: float) -> list[Sent]:
    """Poisson arrivals of each pipeline: the base rate, `step` times it from `step_at`
    for `hold` seconds, then the base rate again."""
    rng = np.random.default_rng(seed)
    end = step_at + hold + after
    sent = []
    for pipeline, base in BASE_RATES.items():
        t = 0.0
        while True:
            rate = base * (step if step_at <= t < step_at + hold else 1.0)
            gap = float(rng.exponential(1 / rate))
            boundary = next((b for b in (step_at, step_at + hold) if t < b <= t + gap), None)
            if boundary is not None:  # the rate changes first: draw again from there
                t = boundary  # (memoryless: the same process, with the step on time)
                continue
            t += gap
            if t >= end:
                break
            sent.append(Sent(pipeline, t))
    return sorted(sent, key=lambda s: s.at)


def body(sent: Sent, n: int) -> dict[str, Any]:
    if sent.pipeline == "rag":
        return {"question": f"How do I get a refund for order {10000 + n}?"}
    return {"text": f"Where is my order {10000 + n}? It is late.", "email": "ana@example.com"}


async def send_all(base_url: str, schedule: list[Sent], started: float) -> float:
    """Send each request at its time after `started` (open loop); the client's CPU
    seconds."""
    import httpx

    from servegraph.security.client import client_headers

    headers = client_headers() | {"X-Request-Timeout": str(DEADLINE_S)}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    cpu = time.process_time()
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=DEADLINE_S + 30, limits=limits
    ) as client:

        async def one(n: int, sent: Sent) -> None:
            await asyncio.sleep(max(0.0, sent.at - (time.monotonic() - started)))
            began = time.monotonic()
            try:
                reply = await client.post(f"/pipelines/{sent.pipeline}", json=body(sent, n))
                sent.status = reply.status_code
            except httpx.HTTPError:
                sent.status = 0
            sent.seconds = time.monotonic() - began

        await asyncio.gather(*(one(n, s) for n, s in enumerate(schedule)))
    return time.process_time() - cpu


# Replica targets are read every SAMPLE_S, and every FINE_SAMPLE_S from 2 s before the
# step to 10 s after it, where the first decisions are timed. Each read costs the
# controller, while the new replicas start: with fine reads for 20 s after the step, a
# seed-4 run had the LLM's capacity ready 88.7 s after the step, with 0.5 s reads 77.6 s.
SAMPLE_S, FINE_SAMPLE_S = 0.5, 0.1


def sample_replicas(
    stop: threading.Event, out: list[Sample], started: float, step_at: float
) -> None:
    from ray import serve

    client = serve.context._get_global_client()
    assert client is not None, "not connected to Serve"
    while not stop.is_set():
        sample = Sample(time.monotonic() - started)  # stamped before the call
        try:
            details = client.get_serve_details()["applications"]
            for server, (app, prefix, _, _) in SERVERS.items():
                deployment = next(
                    d for name, d in details[app]["deployments"].items() if name.startswith(prefix)
                )
                sample.target[server] = int(deployment["target_num_replicas"])
                sample.running[server] = sum(
                    1 for r in deployment["replicas"] if str(r["state"]).endswith("RUNNING")
                )
            out.append(sample)
        except Exception as exc:  # a missed sample, not a dead sampler
            print(f"[spike] sample at {sample.at:.1f} s failed: {exc!r}", flush=True)
        fine = step_at - 2 <= time.monotonic() - started <= step_at + 10
        stop.wait(FINE_SAMPLE_S if fine else SAMPLE_S)


def sample_cpu(
    stop: threading.Event, out: list[dict[str, Any]], started: float, bounds: list[float]
) -> None:
    """Every process's CPU over windows between `bounds` (seconds after `started`), by
    its part in the platform (`benchmarks.cpu`): which process had the cores while the
    new replicas started. This process is the load generator ("client"). A process that
    ended inside a window is not counted in it (psutil reads only the living)."""
    from benchmarks import cpu

    me = os.getpid()

    def role(pid: int, cmdline: str) -> str:
        if pid == me:
            return "client"
        return cpu.platform_role(cmdline) or "other"

    before, at = cpu.snapshot(), time.monotonic()
    idle_before, _ = cpu.idle_and_steal_s()
    for bound in bounds[1:]:
        left = None if math.isinf(bound) else max(0.0, started + bound - time.monotonic())
        ended = stop.wait(left)  # the run ended first: this window is the last, shorter
        after, now = cpu.snapshot(), time.monotonic()
        idle, _ = cpu.idle_and_steal_s()
        used = cpu.usage(before, after, now - at, role)
        out.append(
            {
                "from_s": round(at - started, 1),
                "to_s": round(now - started, 1),
                "idle_cores": round((idle - idle_before) / max(now - at, 1e-9), 2),
                "cpu_s": {
                    k: round(v, 1) for k, v in sorted(used.cpu_s.items(), key=lambda kv: -kv[1])
                },
                "busiest_core_share": {k: round(v, 2) for k, v in used.busiest.items()},
            }
        )
        before, at, idle_before = after, now, idle
        if ended:
            return


@contextmanager
def platform(policy: str, curves_path: Path, workers: int, llm_spare: int = 0) -> Iterator[Any]:
    from deployments.catalog import CATALOG
    from pipelines.rag.ingest import on_deploy
    from servegraph.deploy.capacity.inputs import HEAD_RESOURCE, node_types
    from servegraph.deploy.local_ray import (
        SimulatedNode,
        environment,
        simulated_cluster,
        wait_until_running,
    )
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover

    curves = Curves.model_validate_json(curves_path.read_text())
    types = node_types(ROOT / "cluster.yaml")
    head_type = next(t for t in types if HEAD_RESOURCE in t.resources)
    gpu_type = next(t for t in types if t.resources.get("GPU"))

    def node(t: Any) -> SimulatedNode:
        return SimulatedNode(t.name, {k: v for k, v in t.resources.items() if k != HEAD_RESOURCE})

    env: dict[str, str | None] = {
        "SERVEGRAPH_PROFILE": "gpu",
        "SERVEGRAPH_SIMULATED_MODELS": str(curves_path),
        "SERVEGRAPH_ROUTER_RESOURCES": json.dumps({HEAD_RESOURCE: 0.001}),
        "OTEL_TRACES_EXPORTER": "none",
        **(TUNED_ENV if policy == "tuned" else {}),
    }
    with (
        tempfile.TemporaryDirectory(prefix="servegraph-spike-index-") as index,
        environment(env | {"SERVEGRAPH_INDEX_PATH": index}),
        simulated_cluster(node(head_type), [node(gpu_type)] * workers) as running,
    ):
        plan = plan_platform(
            discover("pipelines"), CATALOG, packages=["pipelines"], all_servers=True
        )
        times = service_times(curves)
        for app in plan.apps:
            if app.name in SERVERS:
                scaling = autoscaling(policy, app.name, times[app.name], llm_spare)
                app.args.setdefault("overrides", {})["autoscaling_config"] = scaling
        plan.deploy()
        wait_until_running([app.name for app in plan.apps], timeout_s=900)
        on_deploy(running.base_url)
        yield running


def p99(sent: list[Sent]) -> float | None:
    """The 99th percentile of the answers' times, a failed request (a 5xx, no answer)
    counting as the whole deadline: a policy that sheds or times out more does not
    look faster for it."""
    times = [s.seconds if s.status == 200 else DEADLINE_S for s in sent]
    return round(float(np.percentile(times, 99)), 3) if times else None


def summarise(
    schedule: list[Sent],
    samples: list[Sample],
    *,
    step_at: float,
    hold: float,
    curves: Curves,
    factor: float,
) -> dict[str, Any]:
    end = max(s.at for s in schedule)
    pipelines: dict[str, Any] = {}
    for pipeline in BASE_RATES:
        mine = [s for s in schedule if s.pipeline == pipeline]
        steady = [s for s in mine if s.at < step_at]
        spike = [s for s in mine if step_at <= s.at < step_at + hold]
        pipelines[pipeline] = {
            "requests": len(mine),
            "p99_steady_s": p99(steady),
            "steady_requests": len(steady),
            "p99_spike_s": p99(spike),
            "spike_requests": len(spike),
            "spike_within_deadline": round(
                sum(1 for s in spike if s.status == 200) / max(1, len(spike)), 4
            ),
            "deadline_misses": sum(1 for s in mine if s.status in (0, 504)),
            "shed": sum(1 for s in mine if s.status == 503),
            "statuses": {str(k): v for k, v in _count(s.status for s in mine).items()},
        }
    servers: dict[str, Any] = {}
    for server in SERVERS:
        before = next((s.target[server] for s in reversed(samples) if s.at < step_at), None)
        decided = next(
            (s for s in samples if s.at >= step_at and s.target[server] > (before or 0)), None
        )
        peak = max(
            (s.target[server] for s in samples if step_at <= s.at < step_at + hold), default=0
        )
        ready = next(
            (
                s
                for s in samples
                if s.at >= step_at and s.running[server] >= peak and peak > (before or 0)
            ),
            None,
        )
        servers[server] = {
            "replicas_before": before,
            "peak_target": peak,
            "first_decision_s": round(decided.at - step_at, 2) if decided else None,
            "capacity_ready_s": round(ready.at - step_at, 2) if ready else None,
        }
    replica_seconds = 0.0  # over the arrivals' span, as the oracle's
    for a, b in itertools.pairwise(samples):
        if a.at < end:
            replica_seconds += sum(a.running.values()) * (min(b.at, end) - a.at)
    return {
        "pipelines": pipelines,
        "servers": servers,
        "replica_seconds": round(replica_seconds, 1),
        "oracle_replica_seconds": round(oracle(curves, factor, step_at, hold, end), 1),
    }


def oracle(curves: Curves, factor: float, step_at: float, hold: float, end: float) -> float:
    """The replica-seconds of a scaler that knew the step in advance: each server's
    replicas for the base load, and for the spike's load from a replica start before the
    step until its end, at the same utilisation target."""
    from servegraph.deploy.scaling.demand import prior_calls
    from servegraph.lang.discovery import discover

    mixes = {name: prior_calls(g) for name, g in discover("pipelines").items()}
    times = service_times(curves)
    total = 0.0
    for server, (_, _, low, high) in SERVERS.items():
        load = sum(rate * mixes[p].get(server, 0.0) for p, rate in BASE_RATES.items())

        def needed(
            calls_per_s: float, server: str = server, low: int = low, high: int = high
        ) -> int:
            return min(high, max(low, math.ceil(calls_per_s * times[server] / UTILISATION)))

        base, spike = needed(load), needed(load * factor)
        start_s = (
            (curves.llm.load_s if server == "llm" else curves.encoder.load_s)
            if curves.llm and curves.encoder
            else 0.0
        )
        total += base * end + (spike - base) * (hold + start_s)
    return total


def _count(values: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def plot(path: Path, schedule: list[Sent], samples: list[Sample], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ats = [s.at for s in schedule]
    axes[0].hist(ats, bins=np.arange(0, max(ats) + 5, 5), color="grey")
    axes[0].set_ylabel("arrivals / 5 s")
    for server in SERVERS:
        axes[1].step(
            [s.at for s in samples], [s.running[server] for s in samples], label=f"{server} running"
        )
        axes[1].step(
            [s.at for s in samples],
            [s.target[server] for s in samples],
            "--",
            label=f"{server} target",
        )
    axes[1].set_ylabel("replicas")
    axes[1].legend(fontsize=7)
    windows = np.arange(0, max(ats) + 10, 10)
    for pipeline in BASE_RATES:
        points = []
        for lo in windows:
            done = [
                s.seconds
                for s in schedule
                if s.pipeline == pipeline and lo <= s.at < lo + 10 and s.status == 200
            ]
            points.append(np.percentile(done, 99) if done else np.nan)
        axes[2].plot(windows + 5, points, marker=".", label=pipeline)
    axes[2].set_ylabel("p99 s (per 10 s)")
    axes[2].set_xlabel("seconds")
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=["default", "tuned", "graph"], default="graph")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--step", type=float, default=10.0, help="the spike's factor")
    parser.add_argument("--step-at", type=float, default=60.0)
    parser.add_argument("--hold", type=float, default=180.0)
    parser.add_argument("--after", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=4, help="simulated GPU workers")
    parser.add_argument("--curves", type=Path, default=CURVES)
    parser.add_argument(
        "--llm-spare",
        type=int,
        default=0,
        help="graph policy: LLM replicas kept beyond the prediction (spare_replicas)",
    )
    parser.add_argument("--json", type=Path, default=Path("spike.json"))
    args = parser.parse_args()
    curves = Curves.model_validate_json(args.curves.read_text())
    schedule = arrivals(args.seed, args.step, args.step_at, args.hold, args.after)
    print(f"[spike] {args.policy}, seed {args.seed}: {len(schedule)} requests", flush=True)
    samples: list[Sample] = []
    if args.llm_spare and args.policy != "graph":
        parser.error("--llm-spare is the graph policy's")
    if not 0 <= args.llm_spare < SERVERS["llm"][3]:
        parser.error(f"--llm-spare: from 0 to under the LLM's {SERVERS['llm'][3]} replicas")
    with platform(args.policy, args.curves.resolve(), args.workers, args.llm_spare) as running:
        stop = threading.Event()
        started = time.monotonic()
        sampler = threading.Thread(
            target=sample_replicas, args=(stop, samples, started, args.step_at)
        )
        # the CPU over the base phase, the spike's first 90 s in thirds (the replicas'
        # starts), its rest and after
        at = args.step_at
        bounds = [0.0, at, at + 30, at + 60, at + 90, at + args.hold, math.inf]
        cpu_windows: list[dict[str, Any]] = []
        cpu_sampler = threading.Thread(
            target=sample_cpu, args=(stop, cpu_windows, started, sorted(set(bounds)))
        )
        sampler.start()
        cpu_sampler.start()
        try:
            client_cpu_s = asyncio.run(send_all(running.base_url, schedule, started))
        finally:
            stop.set()
            sampler.join()
            cpu_sampler.join()
    out = {
        "policy": args.policy,
        "seed": args.seed,
        "step": args.step,
        "step_at_s": args.step_at,
        "hold_s": args.hold,
        "llm_spare_replicas": args.llm_spare,
        "curves": curves.measured_on,
        "client_cpu_s": round(client_cpu_s, 2),
        **summarise(
            schedule, samples, step_at=args.step_at, hold=args.hold, curves=curves, factor=args.step
        ),
        "cpu_windows": cpu_windows,
        "samples": [asdict(s) for s in samples],
    }
    args.json.write_text(json.dumps(out, indent=1))
    png = args.json.with_suffix(".png")
    try:
        spare = f", {args.llm_spare} spare LLM" if args.llm_spare else ""
        title = f"{args.policy}{spare}, seed {args.seed}, step x{args.step:g}"
        plot(png, schedule, samples, title)
        print(f"[spike] wrote {args.json} and {png}")
    except ImportError:
        print(f"[spike] wrote {args.json} (matplotlib missing: no PNG)")
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
