"""The console's page load (issue 30): 20 pipelines and a ring holding 1,000 recent
requests of one of them, loaded in headless chromium (Selenium, offline) from an ingress
served by uvicorn on 127.0.0.1 in this process. Time to interactive is the time from
the navigation's start until the page has drawn what it fetched (the console sets
`window.consoleReadyMs`): the home page (every pipeline's figures, the model servers)
and the page of the pipeline with 1,000 requests (its graph, figures and recent list).

The pipelines are toys of plain functions (the console's subject is the page, not the
models): chains, switches, fan-outs and a loop, as the graph language has them.

    .venv/bin/python -m benchmarks.console [--pipelines 20] [--requests 1000] [--loads 7]

With `--url` (a running platform, e.g. `make run`'s http://127.0.0.1:8000, and its admin
key file) it measures the real console behind Serve's proxy instead, after sending
`--requests` requests of `--pipeline` (default rag_search: no LLM) to fill the ring.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from benchmarks import report
from benchmarks.load import percentile


class Ask(BaseModel):
    text: str
    route: str = "a"


def step(text: str) -> str:
    return text + "."


def route(route: str) -> str:
    return route


def done(state: dict[str, Any]) -> bool:
    return True


def build(n: int) -> Any:
    """A toy pipeline of shape n % 4: a chain, a switch, a fan-out, a loop."""
    from servegraph import Pipeline

    p = Pipeline(f"p{n:02d}", input=Ask, output=str)
    a = p.function("first", step, text=p.input.text)
    shape = n % 4
    if shape == 0:
        b = p.function("second", step, text=a)
        p.returns(p.function("third", step, text=b))
    elif shape == 1:
        cases = {}
        for case in ("a", "b", "c"):
            sub = Pipeline(f"case_{case}", input=Ask, output=str)
            sub.returns(sub.function("work", step, text=sub.input.text))
            cases[case] = sub
        p.returns(p.switch("pick", on=p.input.route, cases=cases, text=a, route=p.input.route))
    elif shape == 2:
        branches = {}
        for branch in ("x", "y"):
            sub = Pipeline(f"branch_{branch}", input=Ask, output=str)
            sub.returns(sub.function("work", step, text=sub.input.text))
            branches[branch] = sub
        fan = p.parallel("fan", branches=branches, text=a, route=p.input.route)
        p.returns(p.function("last", step, text=fan.x))
    else:
        p.returns(p.function("last", step, text=a))
    return p.build()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(app: Any, port: int) -> Any:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server


async def fill(base: str, key: str, names: list[str], busy: str, requests: int) -> None:
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        gate = asyncio.Semaphore(16)

        async def one(name: str, n: int) -> None:
            async with gate:
                answer = await client.post(f"/{name}", json={"text": f"q{n}", "route": "ab"[n % 2]})
                answer.raise_for_status()

        await asyncio.gather(*(one(name, n) for n, name in enumerate(names * 5)))
        await asyncio.gather(*(one(busy, n) for n in range(requests)))  # the ring, all busy's


def browser() -> Any:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1100",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={tempfile.mkdtemp(prefix='sg-console-bench-')}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def time_to_interactive(driver: Any, url: str) -> float:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(url)
    WebDriverWait(driver, 60, poll_frequency=0.02).until(
        lambda d: d.execute_script("return window.consoleReadyMs !== undefined")
    )
    return float(driver.execute_script("return window.consoleReadyMs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", type=int, default=20)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=7, help="page loads timed per page")
    parser.add_argument("--url", help="a running platform's HTTP, instead of toys in-process")
    parser.add_argument("--key-file", default="var/auth/local-admin.key", help="with --url")
    parser.add_argument("--pipeline", default="rag_search", help="with --url: the ring's")
    args = parser.parse_args()
    if args.url:
        key = Path(args.key_file).read_text().strip()
        base = args.url.rstrip("/") + "/pipelines"
        asyncio.run(fill_platform(base, key, args.pipeline, args.requests))
        measure(base, key, args.pipeline, args.loads, "the platform's console")
        return

    home = Path(tempfile.mkdtemp(prefix="sg-console-bench-"))
    os.environ["SERVEGRAPH_AUTH_KEYS"] = str(home / "keys.sqlite3")
    os.environ.pop("SERVEGRAPH_AUTH_UNSAFE_DISABLED", None)
    from deployments.catalog import CATALOG
    from servegraph.engine.runtime import InProcessServers
    from servegraph.security.keys import KeyStore
    from servegraph.serving.ingress import build_fastapi

    key = KeyStore(home / "keys.sqlite3").create("bench", ["admin"])
    graphs = {g.name: g for g in (build(n) for n in range(args.pipelines))}
    app = build_fastapi(graphs, CATALOG, InProcessServers({}))
    port = free_port()
    server = serve(app, port)
    base = f"http://127.0.0.1:{port}"
    busy = "p01"  # a switch: the page draws its three cases
    asyncio.run(fill(base, key, sorted(graphs), busy, args.requests))
    try:
        measure(base, key, busy, args.loads, f"{args.pipelines} pipelines")
    finally:
        server.should_exit = True


async def fill_platform(base: str, key: str, pipeline: str, requests: int) -> None:
    # Every request runs its graph and none is kept (a pipeline with an answer cache,
    # such as rag, would otherwise fill the cache too): the ring holds real runs.
    headers = {"authorization": f"Bearer {key}", "cache-control": "no-cache, no-store"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        gate = asyncio.Semaphore(8)

        async def one(n: int) -> None:
            async with gate:
                question = f"How long do refunds take? ({n})"
                answer = await client.post(f"/{pipeline}", json={"question": question})
                answer.raise_for_status()

        await asyncio.gather(*(one(n) for n in range(requests)))


def measure(base: str, key: str, busy: str, loads_per_page: int, label_of_run: str) -> None:
    detail = httpx.get(
        f"{base}/console/api/pipelines/{busy}",
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    recent = len(detail.json()["recent"])
    print(f"{busy}: {recent} recent requests, the API's answer {len(detail.content)} bytes")

    import psutil

    driver = browser()
    try:
        driver.get(f"{base}/console")
        driver.execute_script("sessionStorage.setItem('servegraph-console-key', arguments[0])", key)
        chromium = psutil.Process(driver.service.process.pid)
        cpu_before = sum(sum(p.cpu_times()[:2]) for p in chromium.children(recursive=True))
        loads: dict[str, list[float]] = {"home": [], busy: []}
        for _ in range(loads_per_page):
            loads["home"].append(time_to_interactive(driver, f"{base}/console"))
            loads[busy].append(time_to_interactive(driver, f"{base}/console#/p/{busy}"))
        rows = driver.execute_script("return document.querySelectorAll('#recent tbody tr').length")
        cpu = sum(sum(p.cpu_times()[:2]) for p in chromium.children(recursive=True)) - cpu_before
    finally:
        driver.quit()
    # One ingress replica's ring each: with several, a page load may read another's.
    print(f"the pipeline page listed {rows} requests (the API {recent})")
    figures = []
    for page, took in loads.items():
        p50, worst = percentile(took, 0.5), max(took)
        label = "console home" if page == "home" else f"pipeline page, {recent} recent requests"
        print(f"{label}: time to interactive p50 {p50:.0f} ms, worst {worst:.0f} ms ({took})")
        figures.append(
            report.Figure(
                f"{label} ({label_of_run}), time to interactive p50",
                p50,
                None,
                "ms",
                "< 1000",
                higher_is_better=False,
            )
        )
    print(f"chromium's CPU over the {2 * loads_per_page} loads: {cpu:.2f} s")
    report.save("console", figures)


if __name__ == "__main__":
    main()
