"""Bounded concurrent load on 127.0.0.1 for the reliability tier and benchmarks: every loop
is bounded in count and in time, and every answer is kept with when it came."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from servegraph.auth import client_headers


@dataclass
class Answer:
    status: int  # 0: no answer (the client gave up)
    seconds: float
    headers: httpx.Headers | None
    body: Any


async def burst(
    base_url: str,
    path: str,
    bodies: list[dict],
    *,
    headers: dict[str, str] | None = None,
    client_timeout_s: float = 60,
) -> list[Answer]:
    """Send every body at once, each on its own connection; the answers, in order."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=client_timeout_s, limits=limits
    ) as client:

        async def one(body: dict) -> Answer:
            started = time.monotonic()
            try:
                response = await client.post(path, json=body, headers=headers)
            except httpx.HTTPError:
                return Answer(0, time.monotonic() - started, None, None)
            try:
                payload = response.json()
            except ValueError:
                payload = response.text
            return Answer(
                response.status_code, time.monotonic() - started, response.headers, payload
            )

        return list(await asyncio.gather(*(one(body) for body in bodies)))


async def callers(
    base_url: str,
    path: str,
    body_for: Any,
    *,
    n: int,
    stop: asyncio.Event,
    max_requests: int,
    max_seconds: float,
    headers: dict[str, str] | None = None,
    answers: list[Answer] | None = None,
    max_per_caller: int | None = None,
) -> list[Answer]:
    """`n` closed-loop callers, each sending `body_for(caller, i)` until `stop` is set,
    `max_requests` were sent in all (or `max_per_caller` by this caller), or `max_seconds`
    passed. The answers are appended
    to `answers` (when given) as they come, and returned."""
    answers = [] if answers is None else answers
    deadline = time.monotonic() + max_seconds
    sent = 0
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=120
    ) as client:

        async def caller(c: int) -> None:
            nonlocal sent
            i = 0
            while not stop.is_set() and sent < max_requests:
                if max_per_caller is not None and i >= max_per_caller:
                    return
                if time.monotonic() > deadline:
                    return
                sent += 1
                started = time.monotonic()
                try:
                    response = await client.post(path, json=body_for(c, i), headers=headers)
                    try:
                        payload = response.json()
                    except ValueError:
                        payload = response.text
                    answers.append(
                        Answer(
                            response.status_code,
                            time.monotonic() - started,
                            response.headers,
                            payload,
                        )
                    )
                except httpx.HTTPError:
                    answers.append(Answer(0, time.monotonic() - started, None, None))
                i += 1

        await asyncio.gather(*(caller(c) for c in range(n)))
    return answers


def one_document(run: str, fact: str) -> Any:
    """`body_for` of `callers` on /pipelines/rag_ingest: one document per request, with
    the id `<run>/c<caller>/d<i>` (so what was acknowledged can be counted afterwards)
    and the metadata `{"run": run}`."""

    def body(c: int, i: int) -> dict:
        document = {"id": f"{run}/c{c}/d{i}", "text": f"Note {i} of caller {c}: {fact}"}
        return {"documents": [document | {"metadata": {"run": run}}]}

    return body


def replica_pids(dashboard_url: str, app: str, deployment: str) -> list[int]:
    """PIDs of the live replicas of `app`'s `deployment`, from Ray's state API at this
    cluster's dashboard (named, since other Ray clusters may run on the machine)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=dashboard_url,
        filters=[
            ("class_name", "=", f"ServeReplica:{app}:{deployment}"),
            ("state", "=", "ALIVE"),
        ],
    )
    return [int(a.pid) for a in actors]


async def until(condition: Any, timeout_s: float, what: str) -> None:
    """Wait, bounded, for `condition()` (run off the event loop); TimeoutError naming
    `what` when it does not hold in time."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


@dataclass
class KillRun:
    answers: list[Answer]
    replica_back_after_s: float


def kill_under_load(
    base_url: str,
    dashboard_url: str,
    path: str,
    body_for: Any,
    *,
    app: str,
    deployment: str,
    n: int,
    before: int,
    after: int,
    headers: dict[str, str] | None = None,
) -> KillRun:
    """`n` callers on `path`; once `before` answers are 200, SIGKILL `deployment`'s only
    replica; keep the load on until a new replica is up and `after` more are 200."""
    import os
    import signal

    answers: list[Answer] = []
    stop = asyncio.Event()

    def ok() -> int:
        return sum(a.status == 200 for a in answers)

    async def run() -> float:
        load = asyncio.ensure_future(
            callers(
                base_url,
                path,
                body_for,
                n=n,
                stop=stop,
                max_requests=20_000,
                max_seconds=300,
                headers=headers,
                answers=answers,
            )
        )
        try:
            await until(lambda: ok() >= before, 120, "no progress before the kill")
            (victim,) = replica_pids(dashboard_url, app, deployment)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            await until(
                lambda: bool(set(replica_pids(dashboard_url, app, deployment)) - {victim}),
                180,
                "no new replica",
            )
            back = time.monotonic() - killed
            base = ok()
            await until(lambda: ok() >= base + after, 180, "no recovery after the restart")
            return back
        finally:
            stop.set()
            await load

    back = asyncio.run(run())
    return KillRun(answers, back)
