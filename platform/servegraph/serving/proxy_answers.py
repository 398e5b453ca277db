"""What Serve's HTTP proxy answers when the replica serving a request dies before
answering (`kill -9`, a crash, its node lost): Serve's proxy sends nothing for it
(`ray.serve._private.http_util.send_http_response_on_exception` answers only 408, 429
and 503), so uvicorn answers a bare `500 Internal Server Error`. This middleware, put
on the proxy through Serve's own hook (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
set by `servegraph.deploy.local_ray.SERVE_REQUEST_PATH_ENV` and cluster.yaml), answers
a 502 that says what happened and what the caller can do instead.

Written by hand because Serve has no setting for the status it gives a lost replica.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from starlette.middleware import Middleware

from servegraph.security.endpoints import json_answer

LOST = {
    "error": "ReplicaLost",
    "detail": "the replica serving this request stopped before it answered (it died or was "
    "restarted); the request may or may not have been carried out",
    "fix": "retry after Retry-After: ingestion and the model servers' routes are "
    "idempotent; a run of a pipeline with an approval node is recorded and finished by "
    "another replica (GET /pipelines/<name>/runs?status=waiting lists those awaiting a "
    "decision)",
}
RETRY_AFTER_S = 1


class AnswerLostReplicas:
    """A pure ASGI middleware: an HTTP request whose handler returned or failed
    without starting its response gets the 502 above; everything else passes through
    untouched (a response already started is never touched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if started:
                raise
        if not started:
            await _lost(send)


async def _lost(send: Any) -> None:
    with suppress(OSError):  # the caller went away too
        await json_answer(send, 502, LOST, {"retry-after": str(RETRY_AFTER_S)})


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares it puts around its ASGI app."""
    return [Middleware(AnswerLostReplicas)]
