"""Admission at the ingress door: at most `max_in_flight` requests of a pipeline run at
once in one ingress replica; past that, 503 with Retry-After at once.

Why here and not only downstream: every model server has a bounded queue, but a request
refused there has already cost the ingress its validation, a graph run and a handle
call or two; under a burst of thousands that work starves the event loop, and the
deadline timers of the admitted requests fire late. Refusing at the door costs little,
so what is admitted is answered on time; and each pipeline gets its own share of the
ingress (Serve's `max_ongoing_requests`/`max_queued_requests` on the ingress bound all
pipelines together, and refuse at the proxy before the ingress sees the request).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

DEFAULT_MAX_IN_FLIGHT = 256
RETRY_AFTER_S = 1


class AdmissionGate:
    """ASGI middleware counting each pipeline's requests in flight (the plain and the
    streamed route together) and refusing those past its limit before any work.

    Args:
        app: the ingress app.
        limits: pipeline name -> requests it may run at once in this replica.
        on_refused: called with the pipeline's name for each refusal (metrics).
        on_arrival: called with the pipeline's name for each request, admitted or
            refused (the demand that graph-aware scaling sizes the servers for).
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: dict[str, int],
        on_refused: Callable[[str], None] | None = None,
        on_arrival: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.in_flight = dict.fromkeys(limits, 0)
        self._on_refused = on_refused
        self._on_arrival = on_arrival

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        name = pipeline_of(scope) if scope["type"] == "http" else None
        if name not in self.limits:
            await self.app(scope, receive, send)
            return
        assert name is not None
        if self._on_arrival is not None:
            self._on_arrival(name)
        if self.in_flight[name] >= self.limits[name]:
            if self._on_refused is not None:
                self._on_refused(name)
            await _refuse(send, name, self.limits[name])
            return
        self.in_flight[name] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[name] -= 1


def pipeline_of(scope: Scope) -> str | None:
    """The pipeline a request runs: `POST /<name>` or `POST /<name>/stream`, below the
    app's mount point (Serve mounts the ingress at /pipelines)."""
    if scope.get("method") != "POST":
        return None
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    parts = path.strip("/").split("/")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] == "stream"):
        return parts[0] or None
    return None


async def _refuse(send: Any, name: str, limit: int) -> None:
    body = json.dumps(
        {
            "error": "OverloadedError",
            "node": "(admission)",
            "detail": f"pipeline {name!r} already runs {limit} requests in this ingress "
            f"replica, its max_in_flight; retry after {RETRY_AFTER_S}s",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
