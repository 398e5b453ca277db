"""Bounded concurrent load on 127.0.0.1 for the reliability tier and benchmarks: every loop
is bounded in count and in time, and every answer is kept with when it came."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx


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
        base_url=base_url, timeout=client_timeout_s, limits=limits
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
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

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
