"""What the fast tier's key tests share: a clock that moves when told, the key usage
metrics as a list, this process's `Guard` swapped for one on a test's own key store,
and an HTTP client of an app in this process sending a key."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from servegraph.security.guard import Guard
from servegraph.security.keys import AuthSettings
from servegraph.security.limits import Limiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class KeyUsage:
    """The key usage metrics (`KeyUsageMetrics`), as a list: (key, status, tokens), and
    each request's tenant."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, dict[str, int] | None]] = []
        self.tenants: list[str] = []

    def record(
        self,
        key: str,
        status: int,
        tokens: dict[str, int] | None = None,
        usd: float = 0.0,
        tenant: str = "default",
    ) -> None:
        self.seen.append((key, status, tokens))
        self.tenants.append(tenant)


@contextmanager
def guard_on(keys: Path, limiter: Any = None, usage: Any = None) -> Iterator[Guard]:
    """This process's Guard on the key store at `keys` (re-read on every check), with
    `limiter` (default: one whose clock stands still) and `usage` (default: a
    `KeyUsage`); the previous one back after."""
    previous = Guard._here
    settings = AuthSettings(keys=keys, cache_s=0)
    Guard._here = Guard(
        settings,
        limiter=limiter if limiter is not None else Limiter(clock=Clock()),
        usage=usage if usage is not None else KeyUsage(),
    )
    try:
        yield Guard._here
    finally:
        Guard._here = previous


def asgi_client(app: Any, key: str | None = None, **headers: str) -> httpx.AsyncClient:
    """A client of `app` over ASGI (no server), sending `key` as a bearer key if any."""
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app", headers=headers
    )
