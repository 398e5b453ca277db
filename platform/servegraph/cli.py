"""`servegraph` command line: run the platform, write a Serve config, check and draw graphs.

servegraph run        start local Ray + Serve, deploy every model server and
                      pipeline, run the pipelines' start-up hooks, keep serving
servegraph build      write the same platform as a `serve deploy` config file
servegraph validate   check every pipeline graph
servegraph render N   draw pipeline N (text, or --mermaid)
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import signal
import sys
import threading
import time
from typing import Any

import yaml
from rich.console import Console

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
    commands.add_parser("validate", help="check every pipeline graph")
    render = commands.add_parser("render", help="draw a pipeline graph")
    render.add_argument("name")
    render.add_argument("--mermaid", action="store_true")
    args = parser.parse_args(argv)
    return {"run": _run, "build": _build, "validate": _validate, "render": _render}[args.command](
        args
    )


def _plan(package: str, catalog: str) -> Any:
    from servegraph.discovery import discover
    from servegraph.graph import resolve
    from servegraph.planner import plan_platform

    return plan_platform(
        discover(package),
        resolve(catalog),
        catalog_path=catalog,
        packages=[package],
        all_servers=True,
    )


def _build(args: argparse.Namespace) -> int:
    env = {"SERVEGRAPH_PROFILE": args.profile} if args.profile else None
    config = _plan(args.package, args.catalog).serve_config(host=args.host, port=args.port, env=env)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as out:
            out.write(text)
        console.print(f"wrote {args.output}; deploy with: serve deploy {args.output}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from servegraph.discovery import discover
    from servegraph.errors import GraphValidationError
    from servegraph.graph import resolve
    from servegraph.validation import validate

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
    from servegraph.discovery import discover
    from servegraph.render import to_mermaid, to_text

    graph = discover(args.package)[args.name]
    print(to_mermaid(graph) if args.mermaid else to_text(graph))
    return 0


def _run(args: argparse.Namespace) -> int:
    from servegraph.local_ray import local_cluster

    plan = _plan(args.package, args.catalog)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with console.status("starting a local Ray cluster"):
        cluster_cm = local_cluster(http_port=args.port, dashboard_port=args.dashboard_port)
        cluster = cluster_cm.__enter__()
    try:
        started = time.perf_counter()
        with console.status("deploying model servers and pipelines (the LLM takes ~1 min)"):
            plan.deploy()
            _wait_running([app.name for app in plan.apps])
        console.print(f"all applications RUNNING after {time.perf_counter() - started:.0f}s")
        for module in _modules(args.package):
            hook = getattr(module, "on_deploy", None)
            if hook is not None:
                hook(cluster.base_url)
        _print_endpoints(cluster, args.package)
        if not args.exit_after_start:
            console.print("serving; Ctrl-C to stop")
            while not stop.wait(1):
                pass
    finally:
        with console.status("shutting down Serve and Ray"):
            cluster_cm.__exit__(None, None, None)
    return 0


def _wait_running(apps: list[str], timeout_s: float = 900) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications
        failed = {
            n: status[n].message
            for n in apps
            if n in status and status[n].status == "DEPLOY_FAILED"
        }
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        if all(n in status and status[n].status == "RUNNING" for n in apps):
            return
        time.sleep(1)
    raise TimeoutError(f"not RUNNING after {timeout_s}s: {apps}")


def _modules(package: str) -> list[Any]:
    root = importlib.import_module(package)
    return [
        importlib.import_module(i.name)
        for i in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
    ]


def _print_endpoints(cluster: Any, package: str) -> None:
    from servegraph.discovery import discover

    base = cluster.base_url
    console.print(f"\n[bold]Ray dashboard[/bold]: {cluster.dashboard_url}")
    console.print(f"[bold]OpenAPI[/bold]: {base}/pipelines/docs")
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
            f"  curl -s {base}/pipelines/{name} -H 'content-type: application/json' -d '{body}'",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line, so it copies and pastes as a command
        )


if __name__ == "__main__":
    raise SystemExit(main())
