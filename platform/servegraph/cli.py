"""`servegraph` command line: run the platform, write a Serve config, check and draw graphs.

servegraph run        start local Ray + Serve, deploy every model server and
                      pipeline, run the pipelines' start-up hooks, keep serving
servegraph build      write the same platform as a `serve deploy` config file
servegraph validate   check every pipeline graph
servegraph render N   draw pipeline N (text, or --mermaid)
servegraph keys       create, list and revoke API keys (`servegraph keys --help`)
servegraph observe    run Prometheus on the running platform, with the alert rules
servegraph check      will the plan fit a cluster? (`--cluster cluster.yaml`; refuses
                      one whose Ray would start without token authentication)
servegraph batch      run a pipeline over a dataset on Ray Data (rows in, results out)
servegraph cost       cost and energy per 1,000 requests, per pipeline and node
servegraph traffic    show or set how a pipeline's requests are shared among its versions
servegraph versions   a pipeline's versions side by side (latency, errors, cost, signals)
servegraph rollout    move a pipeline to a new version step by step, gated; `rollout
                      status N` shows where it is, `rollout abort N` rolls it back
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml
from rich.console import Console

from servegraph.deploy.local_platform import feasible, local_platform, plan_package
from servegraph.settings import AppSettings

console = Console()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="servegraph", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    settings = AppSettings()
    parser.add_argument(
        "--package", default=settings.pipelines, help="where pipelines live (SERVEGRAPH_PIPELINES)"
    )
    parser.add_argument(
        "--catalog",
        default=settings.catalog,
        help="import path of the model servers' Catalog (SERVEGRAPH_CATALOG)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve every pipeline on a local Ray")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--dashboard-port", type=int, default=8265)
    run.add_argument(
        "--ingress",
        choices=["proxy", "haproxy"],
        default=None,
        help="what answers HTTP: Serve's proxy actor, or HAProxy straight to the apps' "
        "replicas (default SERVEGRAPH_INGRESS, else proxy)",
    )
    run.add_argument(
        "--exit-after-start",
        action="store_true",
        help="deploy, run start-up hooks, print endpoints, then stop (for tests)",
    )
    build = commands.add_parser("build", help="write a `serve deploy` config")
    build.add_argument("-o", "--output", default="-")
    build.add_argument("--port", type=int, default=8000)
    build.add_argument("--host", default="127.0.0.1")
    build.add_argument(
        "--profile",
        choices=["cpu", "gpu"],
        default=None,
        help="resource profile baked into the config (SERVEGRAPH_PROFILE)",
    )
    build.add_argument(
        "--cluster",
        default=None,
        help="refuse a plan this cluster.yaml cannot place, or a cluster.yaml whose Ray "
        "starts without token authentication",
    )
    check = commands.add_parser(
        "check", help="pack every deployment onto a cluster.yaml's nodes, at min and max replicas"
    )
    check.add_argument("--cluster", required=True, help="Ray cluster launcher config")
    check.add_argument("--profile", choices=["cpu", "gpu"], default=None)
    batch = commands.add_parser(
        "batch", help="run a pipeline over a dataset (JSONL, CSV or Parquet) on Ray Data"
    )
    batch.add_argument("pipeline")
    batch.add_argument("input", help="rows in: .jsonl, .csv or .parquet")
    batch.add_argument(
        "output", help="results out: .jsonl (appended as rows finish), .csv or .parquet"
    )
    batch.add_argument(
        "--address",
        default=None,
        help="a Ray cluster with the platform deployed (default: start one locally)",
    )
    batch.add_argument("--concurrency", type=int, default=64, help="rows in flight at once")
    batch.add_argument(
        "--max-cost-usd",
        type=float,
        default=None,
        help="each row's maximum cost; a row that would pass it is an error row (402)",
    )
    cost = commands.add_parser(
        "cost", help="cost and energy per 1,000 requests, per pipeline and node, from Prometheus"
    )
    cost.add_argument("--prometheus", default="http://127.0.0.1:9090", help="`make observe`'s")
    cost.add_argument("--window", default="1h", help="PromQL duration, e.g. 15m, 1h, 7d")
    commands.add_parser("validate", help="check every pipeline graph")
    render = commands.add_parser("render", help="draw a pipeline graph")
    render.add_argument("name")
    render.add_argument("--mermaid", action="store_true")
    _keys_parser(commands)
    traffic = commands.add_parser(
        "traffic",
        help="show or set how a pipeline's requests are shared among its versions",
        description="Without --weights or --clear: show the split. Applies on every "
        "ingress replica within a second; no model server is redeployed.",
    )
    traffic.add_argument("pipeline")
    traffic.add_argument("--weights", help="VERSION=PERCENT,... summing to 100, e.g. v1=90,v2=10")
    traffic.add_argument(
        "--shadow", help="VERSION=PERCENT: that share of requests also runs on VERSION"
    )
    traffic.add_argument(
        "--not-sticky", action="store_true", help="each request draws (else a caller keeps one)"
    )
    traffic.add_argument("--clear", action="store_true", help="all traffic to the default")
    traffic.add_argument("--url", default="http://127.0.0.1:8000", help="the platform's HTTP")
    versions = commands.add_parser(
        "versions",
        help="a pipeline's versions side by side, from Prometheus: latency, errors, cost, "
        "answer signals, shadow agreement",
    )
    versions.add_argument("pipeline")
    versions.add_argument("--prometheus", default="http://127.0.0.1:9090", help="`make observe`'s")
    versions.add_argument("--window", default="15m", help="PromQL duration, e.g. 5m, 1h")
    _rollout_parser(commands)
    observe = commands.add_parser(
        "observe", help="Prometheus (Debian's package) on the running platform, with alerts"
    )
    observe.add_argument("--port", type=int, default=9090)
    observe.add_argument("--rules", default=settings.alert_rules, help="alert rules file")
    observe.add_argument(
        "--service-discovery",
        default=None,
        help="Ray's scrape-target file (default /tmp/ray/prom_metrics_service_discovery.json)",
    )
    args = parser.parse_args(argv)
    commands_by_name = {
        "run": _run,
        "build": _build,
        "validate": _validate,
        "render": _render,
        "keys": _keys,
        "observe": _observe,
        "check": _check,
        "batch": _batch,
        "cost": _cost,
        "traffic": _traffic,
        "versions": _versions,
        "rollout": _rollout,
    }
    return commands_by_name[args.command](args)


def _rollout_parser(commands: Any) -> None:
    from servegraph.serving.rollout import DEFAULT_GATES, DEFAULT_STEPS, FIGURES

    rollout = commands.add_parser(
        "rollout",
        help="move a pipeline's traffic to a version step by step; roll back at the first "
        "failed gate",
        description="servegraph rollout PIPELINE --to VERSION [options]: start (or resume) "
        "a rollout and drive it to its end. servegraph rollout status PIPELINE: where it "
        "is. servegraph rollout abort PIPELINE: all traffic back to the current version. "
        "Gates compare the candidate with the current version over each step, from "
        "Prometheus: FIGURE<=BOUND or FIGURE>=BOUND, the bound a ratio (1.2x), a "
        f"difference (+0.01) or a value; figures: {', '.join(FIGURES)} and the "
        "pipeline's answer signals (`servegraph traffic PIPELINE` lists them). Exit "
        "status: 0 promoted, 1 rolled back, 3 aborted, 2 bad options or the platform "
        "did not answer. A rollout under way keeps its options: rerun it without them "
        "to resume it.",
    )
    rollout.add_argument("words", nargs="+", metavar="[status|abort] PIPELINE")
    rollout.add_argument("--to", help="the candidate version")
    rollout.add_argument(
        "--steps",
        help="the candidate's percent at each step, the last 100 (promotion); default "
        + ",".join(map(str, DEFAULT_STEPS)),
    )
    rollout.add_argument("--hold", help="how long each step is held (90s, 10m; default 10m)")
    rollout.add_argument(
        "--max-hold",
        default=None,
        help="then roll back if still no verdict (default 3 times --hold)",
    )
    rollout.add_argument(
        "--gate",
        action="append",
        default=None,
        help=f"repeat for each gate (default {' '.join(DEFAULT_GATES)})",
    )
    rollout.add_argument(
        "--min-requests",
        type=int,
        help="each version's requests in a step before its gates are judged (default 20)",
    )
    rollout.add_argument("--interval", default="30s", help="how often the step is checked")
    rollout.add_argument("--not-sticky", action="store_true", help="each request draws")
    rollout.add_argument("--url", default="http://127.0.0.1:8000", help="the platform's HTTP")
    rollout.add_argument("--prometheus", default="http://127.0.0.1:9090", help="`make observe`'s")


def _keys_parser(commands: Any) -> None:
    keys = commands.add_parser(
        "keys",
        help="API keys: create (printed once), list, revoke",
        description="API keys live hashed in SERVEGRAPH_AUTH_KEYS "
        "(default $SERVEGRAPH_HOME/auth/keys.sqlite3); every replica sees a change at its "
        "next request, or within SERVEGRAPH_AUTH_CACHE_S seconds (2) where file times lag.",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (only this once)")
    create.add_argument("--name", required=True, help="shown in metrics and `keys list`")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="admin, llm, invoke:<pipeline>, invoke:*, write:<pipeline>, write:* (repeatable)",
    )
    create.add_argument("--rps", type=float, default=None, help="requests per second (burst 1 s)")
    create.add_argument(
        "--tokens-per-min", type=int, default=None, help="LLM tokens (input + output) per minute"
    )
    create.add_argument(
        "--tenant",
        default="default",
        help="whose documents the key reads and writes (default: the default tenant); "
        "an admin key may act for any tenant with the X-Servegraph-Tenant header",
    )
    actions.add_parser(
        "list", help="names, tenants, scopes, limits, created, last used (never the key)"
    )
    revoke = actions.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")


def _observe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from servegraph.telemetry.observe import RAY_SERVICE_DISCOVERY, prometheus

    discovery = Path(args.service_discovery) if args.service_discovery else RAY_SERVICE_DISCOVERY
    if not discovery.exists():
        console.print(f"[red]{discovery} is missing: start the platform first (make run)[/red]")
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with prometheus(port=args.port, rules=Path(args.rules), service_discovery=discovery) as prom:
        console.print(
            f"Prometheus: {prom.url} (targets: {prom.url}/targets, alerts: {prom.url}/alerts)"
        )
        console.print(f"alert rules: {args.rules}; scraping the Ray nodes listed in {discovery}")
        console.print("observing; Ctrl-C to stop")
        while not stop.wait(5):
            down = [t["scrapeUrl"] for t in prom.targets() if t["health"] == "down"]
            if down:
                console.print(f"[yellow]targets down: {down}[/yellow]")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from servegraph.security.keys import AuthSettings, KeyStore

    store = KeyStore(AuthSettings().store_path)
    if args.action == "create":
        try:
            key = store.create(
                args.name, args.scope, args.rps, args.tokens_per_min, tenant=args.tenant
            )
        except ValueError as exc:  # a taken name, an unknown scope, a bad tenant name
            console.print(str(exc), style="red", markup=False)
            return 2
        console.print(f"created key {args.name!r}; it is shown only now:", highlight=False)
        print(key)
        return 0
    if args.action == "list":
        for spec in store.list():
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(spec.last_used or 0))
            console.print(
                f"{spec.name}  tenant={spec.tenant}  scopes={','.join(spec.scopes)}  "
                f"rps={spec.requests_per_s or '-'}  "
                f"tokens/min={spec.tokens_per_min or '-'}  "
                f"created={time.strftime('%Y-%m-%d %H:%M', time.localtime(spec.created))}  "
                f"last used={used if spec.last_used else 'never'}",
                highlight=False,
                markup=False,
            )
        return 0
    if store.revoke(args.name):
        console.print(f"revoked {args.name!r}; replicas refuse it from their next request")
        return 0
    console.print(f"no key named {args.name!r}", style="red", markup=False)
    return 1


def _check(args: argparse.Namespace) -> int:
    if not _ray_authenticated(args.cluster):
        return 1
    verdict_ok = feasible(_plan_for(args), args.cluster, console)
    return 0 if verdict_ok else 1


def _ray_authenticated(cluster: str) -> bool:
    """False, saying why for each node type, when Ray on a node `cluster` starts would
    run without token authentication (anyone reaching its ports could run code)."""
    from pathlib import Path

    from servegraph.deploy.capacity.inputs import ray_auth_problems

    problems = ray_auth_problems(Path(cluster))
    for problem in problems:
        console.print(problem, style="red", markup=False, highlight=False, soft_wrap=True)
    if problems:
        console.print(
            f"refusing {cluster}: its Ray control plane would be open to anyone reaching it",
            style="red",
            markup=False,
            soft_wrap=True,
        )
    return not problems


def _plan_for(args: argparse.Namespace) -> Any:
    """The plan as the cluster's nodes would build it: with the placement settings
    `--cluster`'s head exports (profile, router placement), then `--profile` (the
    builders read them from the environment)."""
    import os
    from pathlib import Path

    from servegraph.deploy.capacity.inputs import cluster_env

    if getattr(args, "cluster", None):
        os.environ.update(cluster_env(Path(args.cluster)))
    if getattr(args, "profile", None):
        os.environ["SERVEGRAPH_PROFILE"] = args.profile
    return plan_package(args.package, args.catalog)


def _build(args: argparse.Namespace) -> int:
    if args.cluster and not _ray_authenticated(args.cluster):
        return 1
    env = {"SERVEGRAPH_PROFILE": args.profile} if args.profile else None
    plan = _plan_for(args)
    if args.cluster and not feasible(plan, args.cluster, console):
        return 1
    config = plan.serve_config(host=args.host, port=args.port, env=env)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as out:
            out.write(text)
        console.print(f"wrote {args.output}; deploy with: serve deploy {args.output}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from servegraph.errors import GraphValidationError
    from servegraph.lang.discovery import discover
    from servegraph.lang.graph import resolve
    from servegraph.lang.validation import validate

    failed = 0
    for name, graph in discover(args.package).items():
        try:
            validate(graph, resolve(args.catalog))
            console.print(f"[green]ok[/green] {name}")
        except GraphValidationError as exc:
            failed += 1
            console.print(f"[red]invalid[/red] {exc}", markup=False)
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    from servegraph.lang.discovery import discover
    from servegraph.lang.render import to_mermaid, to_text

    graph = discover(args.package)[args.name]
    print(to_mermaid(graph) if args.mermaid else to_text(graph))
    return 0


def _run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    key_file = _local_admin_key()  # before the cluster, which would create it quietly
    with _local_platform(
        args, http_port=args.port, dashboard_port=args.dashboard_port, ingress=args.ingress
    ) as cluster:
        if cluster is None:
            return 1
        # After Ray started: its core worker installs a SIGTERM handler that aborts the
        # process; ours stops serving and shuts Serve and Ray down cleanly instead.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        _print_endpoints(cluster, args.package, key_file)
        if not args.exit_after_start:
            console.print("serving; Ctrl-C to stop")
            while not stop.wait(1):
                pass
    return 0


def _local_platform(args: argparse.Namespace, **cluster_options: Any) -> Any:
    """`servegraph.deploy.local_platform.local_platform` for this command's package and
    catalog (a name the batch test replaces)."""
    return local_platform(args.package, args.catalog, console, **cluster_options)


def _cost(args: argparse.Namespace) -> int:
    from rich.table import Table

    from servegraph.cost.report import per_thousand
    from servegraph.telemetry.observe import Prometheus

    rows = per_thousand(Prometheus(args.prometheus).query, args.window)
    if not rows:
        console.print(f"no pipeline requests in the last {args.window} at {args.prometheus}")
        return 1
    table = Table(title=f"per 1,000 requests, last {args.window} (servegraph.cost.prices.Prices)")
    for column in ("pipeline", "node", "requests", "USD / 1,000", "Wh / 1,000"):
        table.add_column(column, justify="left" if column in ("pipeline", "node") else "right")
    for row in rows:
        table.add_row(
            row.pipeline,
            "(all)",
            f"{row.requests:.0f}",
            f"{row.usd_per_1000:.5f}",
            f"{row.wh_per_1000:.3f}",
        )
        for node, usd in row.nodes_usd_per_1000.items():
            table.add_row("", node, "", f"{usd:.5f}", "")
    console.print(table)
    return 0


def _traffic(args: argparse.Namespace) -> int:
    import httpx
    from rich.table import Table

    from servegraph.security.client import client_headers

    def pairs(text: str, option: str) -> dict[str, int]:
        try:
            return {
                version.strip(): int(percent)
                for version, percent in (item.split("=", 1) for item in text.split(","))
            }
        except ValueError:
            raise SystemExit(
                f"{option}: write VERSION=PERCENT[,...] with whole percents, e.g. v1=90,v2=10"
            ) from None

    if args.clear and (args.weights or args.shadow):
        raise SystemExit("--clear: give it alone (it sends all traffic to the default)")
    if args.shadow and not args.weights:
        raise SystemExit("--shadow: give --weights too (the split the shadow runs beside)")
    url = f"{args.url.rstrip('/')}/pipelines/{args.pipeline}/traffic"
    with httpx.Client(headers=client_headers(), timeout=30) as client:
        if args.clear:
            answer = client.delete(url)
        elif args.weights:
            split: dict[str, Any] = {
                "weights": pairs(args.weights, "--weights"),
                "sticky": not args.not_sticky,
            }
            if args.shadow:
                shadowed = pairs(args.shadow, "--shadow")
                if len(shadowed) != 1:
                    raise SystemExit("--shadow: one VERSION=PERCENT, e.g. v2=100")
                ((version, percent),) = shadowed.items()
                split |= {"shadow": version, "shadow_percent": percent}
            answer = client.put(url, json=split)
        else:
            answer = client.get(url)
    if answer.status_code != 200:
        body = answer.json() if answer.headers.get("content-type") == "application/json" else {}
        details = body.get("detail")
        for item in details if isinstance(details, list) else [body or {"error": answer.text}]:
            console.print(f"[red]{answer.status_code}[/red] {item}", highlight=False)
        return 2
    shown = answer.json()
    split = shown["split"]
    table = Table(title=f"{shown['pipeline']}: traffic (revision {shown['revision']})")
    for column in ("version", "weight %", "shadow %"):
        table.add_column(column, justify="left" if column == "version" else "right")
    for version in shown["versions"]:
        shadow = split["shadow_percent"] if split.get("shadow") == version else 0
        table.add_row(version, str(split["weights"].get(version, 0)), f"{shadow:g}")
    console.print(table)
    console.print(f"sticky per caller: {'yes' if split['sticky'] else 'no'}", highlight=False)
    for version, names in (shown.get("signals") or {}).items():
        if names:  # what a rollout's gates may name besides the figures
            console.print(f"{version} answer signals: {', '.join(names)}", highlight=False)
    return 0


def _versions(args: argparse.Namespace) -> int:
    from rich.table import Table

    from servegraph.lang.discovery import version_order
    from servegraph.telemetry.observe import Prometheus
    from servegraph.telemetry.versions import compare

    rows = compare(Prometheus(args.prometheus).query, args.pipeline, args.window)
    if not rows:
        console.print(f"no {args.pipeline} requests in the last {args.window} at {args.prometheus}")
        return 1
    rows.sort(key=lambda r: (r.role != "primary", version_order(r.version)))

    def ms(value: float | None) -> str:
        return f"{value:.0f}" if value is not None else "-"

    table = Table(title=f"{args.pipeline}: its versions, last {args.window}")
    table.add_column("figure")
    for row in rows:
        table.add_column(f"{row.version} ({row.role})", justify="right")
    figures: list[tuple[str, list[str]]] = [
        ("requests", [f"{r.requests:.0f}" for r in rows]),
        ("p50 ms", [ms(r.p50_ms) for r in rows]),
        ("p99 ms", [ms(r.p99_ms) for r in rows]),
        ("errors %", [f"{100 * r.error_share:.2f}" for r in rows]),
        ("deadline misses %", [f"{100 * r.deadline_miss_share:.2f}" for r in rows]),
        ("refused (503) %", [f"{100 * r.refused_share:.2f}" for r in rows]),
        (
            "USD / request",
            [f"{r.usd_per_request:.2e}" if r.usd_per_request is not None else "-" for r in rows],
        ),
    ]
    for name in sorted({s for r in rows for s in r.signals}):
        means = [f"{r.signals[name]:.3f}" if name in r.signals else "-" for r in rows]
        figures.append((f"signal: {name}", means))
    agreements = [f"{r.agreement:.3f}" if r.agreement is not None else "-" for r in rows]
    figures.append(("agreement with the primary", agreements))
    for figure, values in figures:
        table.add_row(figure, *values)
    console.print(table)
    return 0


def _rollout(args: argparse.Namespace) -> int:
    import httpx

    from servegraph.serving.rollout import Refused

    try:
        return _drive_rollout(args)
    except (httpx.HTTPError, Refused) as exc:
        console.print(f"[red]the platform at {args.url}[/red]: {exc}", highlight=False)
        return 2


def _drive_rollout(args: argparse.Namespace) -> int:
    from servegraph.security.client import client_headers
    from servegraph.serving import rollout as ro
    from servegraph.settings import home

    store = ro.Rollouts(home() / "rollouts")
    words = args.words
    action = words[0] if words[0] in ("status", "abort") else "run"
    if len(words) != (1 if action == "run" else 2):
        console.print("servegraph rollout [status|abort] PIPELINE: one pipeline")
        return 2
    pipeline = words[-1]
    if action == "status":
        shown = store.load(pipeline)
        if shown is None:
            console.print(f"no rollout of {pipeline} recorded in {store.directory}")
            return 1
        _show_rollout(shown)
        return 0
    traffic = ro.HttpTraffic(args.url, pipeline, client_headers())
    if action == "abort":
        return _abort_rollout(store, traffic, pipeline)
    try:
        with store.driving(pipeline):  # the state is read and written under the lock
            split = functools.cache(traffic.shown)  # asked once, only when needed
            state = _rollout_state(store.load(pipeline), pipeline, split, args)
            signals = split().get("signals", {})
            names = set(signals.get(state.current, [])) & set(signals.get(state.candidate, []))
            driver = ro.Driver(
                state,
                store,
                traffic,
                ro.prometheus_figures(args.prometheus),
                names,
                interval_s=ro.parse_duration(args.interval, "--interval"),
                say=_say_rollout,
            )
            store.save(state)
            console.print(
                f"{pipeline}: {state.current} -> {state.candidate}, steps "
                f"{', '.join(f'{p} %' for p in state.steps)}, each held {state.hold_s:.0f} s; "
                f"gates: {', '.join(state.gates)}",
                highlight=False,
            )
            try:
                final = driver.run()
            except Exception as exc:
                percent = state.history[-1].percent if state.history else 0
                console.print(
                    f"[red]the rollout of {pipeline} stopped[/red] ({exc}); it was "
                    f"{state.status.replace('_', ' ')} with {state.candidate} at up to "
                    f"{percent} %, and the split may still say so; `servegraph rollout "
                    f"{pipeline}` resumes it",
                    highlight=False,
                )
                return 2
    except ro.RolloutError as exc:
        console.print(f"[red]{exc.field}[/red]: {exc.error}; {exc.fix}", highlight=False)
        return 2
    except ro.Busy as exc:
        console.print(f"[red]{exc}[/red]; `servegraph rollout status {pipeline}`")
        return 2
    return {"promoted": 0, "rolled_back": 1}.get(final.status, 3)


def _rollout_state(
    saved: Any, pipeline: str, split: Callable[[], dict[str, Any]], args: argparse.Namespace
) -> Any:
    """The rollout to drive: the one under way (resumed), or a new one from the options
    and the pipeline's traffic (`split()`: `GET /pipelines/<name>/traffic`)."""
    from servegraph.serving import rollout as ro

    options = {
        "--steps": args.steps,
        "--hold": args.hold,
        "--max-hold": args.max_hold,
        "--gate": args.gate,
        "--min-requests": args.min_requests,
        "--not-sticky": args.not_sticky or None,
    }
    if saved is not None and not saved.finished:
        if args.to and args.to != saved.candidate:
            raise ro.RolloutError(
                "--to",
                f"a rollout of {pipeline} to {saved.candidate} is under way",
                f"resume it (leave out --to), or `servegraph rollout abort {pipeline}`",
            )
        given = [option for option, value in options.items() if value is not None]
        if given:
            raise ro.RolloutError(
                given[0],
                f"the rollout of {pipeline} under way keeps the options it started with",
                f"leave out {', '.join(given)} to resume it, or abort it and start again",
            )
        console.print(
            f"resuming the rollout of {pipeline} to {saved.candidate} at "
            f"{saved.steps[saved.step]} %",
            highlight=False,
        )
        return saved
    shown = split()
    served = shown["versions"]
    if not args.to or args.to not in served:
        error = "no candidate" if not args.to else f"{args.to!r} is not served"
        raise ro.RolloutError("--to", error, f"name one of {', '.join(served)}")
    hold = ro.parse_duration(args.hold or "10m", "--hold")
    max_hold = ro.parse_duration(args.max_hold, "--max-hold") if args.max_hold else 3 * hold
    if max_hold < hold:
        raise ro.RolloutError("--max-hold", "shorter than --hold", "give at least the hold")
    if args.min_requests is not None and args.min_requests < 1:
        raise ro.RolloutError("--min-requests", "below 1", "judge gates on 1 request or more")
    return ro.RolloutState(
        pipeline=pipeline,
        current=ro.current_version(shown["split"]["weights"], served, args.to),
        candidate=args.to,
        steps=ro.parse_steps(args.steps or ",".join(map(str, ro.DEFAULT_STEPS))),
        hold_s=hold,
        max_hold_s=max_hold,
        gates=args.gate or list(ro.DEFAULT_GATES),
        min_requests=args.min_requests or 20,
        sticky=not args.not_sticky,
    )


def _abort_rollout(store: Any, traffic: Any, pipeline: str) -> int:
    """All traffic back to the current version. Moving the split is the abort: a driver
    still running sees a split it did not set and stops; with none running, the state is
    ended here (under the lock, read again there)."""
    from servegraph.serving import rollout as ro

    state = store.load(pipeline)
    if state is None or state.finished:
        console.print(f"no rollout of {pipeline} is under way")
        return 2
    try:
        traffic.set(state.weights(0), state.sticky)
        console.print(f"{pipeline}: all traffic back to {state.current}", highlight=False)
    except ro.Refused as exc:  # e.g. the candidate is gone: end the rollout all the same
        console.print(f"[yellow]the split was not moved[/yellow]: {exc}", highlight=False)
    try:
        with store.driving(pipeline):
            state = store.load(pipeline)
            if state is not None and not state.finished:
                state.status, state.ended = "aborted", time.time()
                state.reason = f"aborted by `servegraph rollout abort`; {state.current} has all"
                store.save(state)
    except ro.Busy:
        pass  # its driver stops at its next check
    return 3


def _say_rollout(event: Any) -> None:
    """A rollout's console: each check as the two versions side by side with the gates,
    and the end."""
    from rich.table import Table

    from servegraph.serving.rollout import Check, number

    if not isinstance(event, Check):
        colour = {"promoted": "green", "rolled_back": "red"}.get(event.status, "yellow")
        console.print(
            f"[bold {colour}]{event.pipeline}: {event.status.replace('_', ' ')}[/bold {colour}]"
            f": {event.reason}",
            highlight=False,
        )
        return
    state, step = event.state, event.step
    table = Table(
        title=f"{state.pipeline}: step {state.step + 1} of {len(state.steps)}, "
        f"{state.candidate} at {step.percent} %, held {event.held_s:.0f} of "
        f"{state.hold_s:.0f} s",
        title_justify="left",
    )
    for column in ("gate", f"{state.current} (current)", f"{state.candidate}", "limit", ""):
        table.add_column(column, justify="left" if column in ("gate", "") else "right")
    requests = [f"{step.requests.get(v, 0):.0f}" for v in (state.current, state.candidate)]
    table.add_row(
        "requests", *requests, f">= {state.min_requests}", "" if event.enough else "waiting"
    )
    for verdict in event.verdicts:
        result = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "no figure"}[
            verdict.passed
        ]
        table.add_row(
            verdict.gate,
            number(verdict.current),
            number(verdict.candidate),
            number(verdict.limit),
            result if event.enough else "waiting",
        )
    console.print(table)
    if event.note:
        console.print(f"[yellow]{event.note}[/yellow]", highlight=False)


def _show_rollout(state: Any) -> None:
    from datetime import UTC, datetime

    from rich.table import Table

    def at(t: float | None) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S") if t else "-"

    console.print(
        f"{state.pipeline}: {state.current} -> {state.candidate}, {state.status.replace('_', ' ')}"
        + (f" ({state.reason})" if state.reason else ""),
        highlight=False,
    )
    table = Table(title=f"gates: {', '.join(state.gates)}", title_justify="left")
    for column in ("step", "started (UTC)", "ended", "outcome", "requests", "gates"):
        table.add_column(column)
    for step in state.history:
        requests = ", ".join(f"{v} {n:.0f}" for v, n in step.requests.items())
        gates = "; ".join(
            f"{v.gate} {'pass' if v.passed else 'FAIL' if v.passed is False else '-'}"
            for v in step.verdicts
        )
        table.add_row(
            f"{step.percent} %", at(step.started), at(step.ended), step.outcome, requests, gates
        )
    for percent in state.steps[len(state.history) :]:
        table.add_row(f"{percent} %", "-", "-", "to come", "", "")
    console.print(table)


def _batch(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from servegraph.offline import batch

    def run() -> Any:
        with Progress(
            TextColumn(f"{args.pipeline}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} rows/s"),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("rows", total=None, rate=0.0)
            started = time.monotonic()

            def advance(done: int, total: int) -> None:
                rate = done / max(time.monotonic() - started, 1e-9)
                progress.update(task, completed=done, total=total, rate=rate)

            return batch(
                args.pipeline,
                args.input,
                args.output,
                concurrency=args.concurrency,
                max_cost_usd=args.max_cost_usd,
                package=args.package,
                catalog=args.catalog,
                on_progress=advance,
            )

    if args.address:
        from servegraph.deploy.local_ray import attach

        attach(args.address)
        report = run()
    else:
        with _local_platform(args, dashboard=False) as cluster:
            if cluster is None:
                return 1
            report = run()
    console.print(
        f"{report.written} rows written to {args.output} ({report.skipped} already there): "
        f"{report.failed} failed, {report.invalid} invalid; "
        f"{report.rows_per_s:.1f} rows/s over {report.seconds:.0f} s"
    )
    return 0 if not report.failed else 2


def _local_admin_key() -> str | None:
    """Create the local user's admin key once (idempotent); the file that holds it, for
    the curl examples. None when auth is off (SERVEGRAPH_AUTH_UNSAFE_DISABLED)."""
    from servegraph.security.client import ensure_local_admin_key

    local = ensure_local_admin_key()
    if local is None:
        console.print(
            "[bold red]UNSAFE: API keys are off (SERVEGRAPH_AUTH_UNSAFE_DISABLED): anyone "
            "who reaches the port can use every route[/bold red]"
        )
        return None
    path, created = local
    console.print(
        f"API keys on: {'created' if created else 'kept'} your admin key in {path} (mode "
        "0600); more keys: `servegraph keys create --name NAME --scope SCOPE`",
        highlight=False,
    )
    return str(path)


def _print_endpoints(cluster: Any, package: str, key_file: str | None = None) -> None:
    from servegraph.lang.discovery import discover

    auth = f' -H "authorization: Bearer $(cat {key_file})"' if key_file else ""
    base = cluster.base_url
    console.print(f"\n[bold]Ray dashboard[/bold]: {cluster.dashboard_url}")
    if cluster.gcs_address:
        console.print(
            f"[bold]Ray[/bold]: {cluster.gcs_address}  (servegraph batch ... --address "
            f"{cluster.gcs_address})"
        )
    console.print(f"[bold]OpenAPI[/bold]: {base}/pipelines/docs")
    console.print(f"[bold]Console[/bold]: {base}/pipelines/console  (asks for a key once)")
    console.print(f"[bold]OpenAI-compatible LLM[/bold]: {base}/v1  (e.g. {base}/v1/models)")
    for name, graph in discover(package).items():
        example = getattr(importlib.import_module(graph.input.split(":")[0]), "EXAMPLES", {}).get(
            name, {}
        )
        body = json.dumps(example) if example else "{}"
        console.print(
            f"[bold]{name}[/bold]: POST {base}/pipelines/{name}  (SSE: .../{name}/stream)",
            highlight=False,
        )
        console.print(
            f"  curl -s {base}/pipelines/{name}{auth} -H 'content-type: application/json' "
            f"-d '{body}'",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line, so it copies and pastes as a command
        )


if __name__ == "__main__":
    raise SystemExit(main())
