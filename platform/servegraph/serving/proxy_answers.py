"""What Serve's HTTP proxy answers itself, through Serve's own hook for middlewares on
the proxy (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, set by
`servegraph.deploy.local_ray.SERVE_REQUEST_PATH_ENV` and cluster.yaml):

- `FrontDoor`: a pipeline's requests past what the ingress admits are refused here, at
  once, with the ingress's own 503 + Retry-After (`servegraph.serving.admission`).
  Serve's own refusal (`max_queued_requests`) comes only after its router has tried to
  place the request, and a refusal by the ingress's gate after a replica round trip; in
  a burst of 1,200 on 2 cores those took 2-6 s to reach the callers (issue 23).
- `AnswerLostReplicas`: when the replica serving a request dies before answering
  (`kill -9`, a crash, its node lost), Serve's proxy sends nothing for it
  (`ray.serve._private.http_util.send_http_response_on_exception` answers only 408,
  429 and 503), so uvicorn answers a bare `500 Internal Server Error`. This answers a
  502 that says what happened and what the caller can do instead.

Written by hand because Serve has neither a per-route limit in its proxy nor a setting
for the status it gives a lost replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

from starlette.middleware import Middleware

from servegraph.security.endpoints import bearer_key, json_answer
from servegraph.security.guard import Guard
from servegraph.serving.admission import AdmissionGate, PublishedLimits, pipeline_below

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
# How long an admitted request at most yields to its pipeline's refusals (`admitted`),
# and for how long into a flood of them it does: a flood older than that is lasting
# overload, not a burst. At 0.5 s, a burst that took longer to refuse (1,200 at once
# on a slow moment of 2 cores) had its tail routed with the admitted requests: 503 p99
# up to 1.12 s, against 0.40-0.62 s at 1 s (issue 23's burst, 7 runs).
REFUSALS_FIRST_S = 1.0
FLOOD_FIRST_S = 2.0
ADMISSION_PATH = "/-/admission"  # GET on a proxy: whether its front door gates

_log = logging.getLogger("ray.serve")


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


class FrontDoor(AdmissionGate):
    """The admission gate in front of Serve's proxy: in flight through this proxy, each
    pipeline gets what the ingress admits in all (the sum of its `max_in_flight` over
    the ingress replicas now running, as they publish it), and no more. Only a request
    whose key is valid and has the pipeline's scope is counted (as at the ingress,
    where the key is checked before the gate); any other passes to the ingress, which
    answers 401 or 403, so a caller without a key holds no place. Each refusal is
    counted where the ingress counts its own (`servegraph_pipeline_requests{status=
    "503"}`) and reported to the demand board as an arrival, as the ingress does, so
    graph-aware scaling sees the demand it turned away. With several proxies each
    admits that much: the ingress's gate still holds the total.

    Serve also installs its proxy's middlewares on each replica's own HTTP server when
    replicas take HTTP directly (`RAY_SERVE_ENABLE_DIRECT_INGRESS`, which HAProxy mode
    sets): there, and if anything here fails to set up, it passes everything through.

    Args:
        app: Serve's proxy app.
        limits: default: what the ingress published (`PublishedLimits`), with the
            counting above; given (tests), every request is counted and only
            `on_refused` is called.
        prefix: where the ingress is mounted, with `limits` given.
    """

    def __init__(
        self,
        app: Any,
        limits: Mapping[str, int] | None = None,
        on_refused: Callable[[str], None] | None = None,
        prefix: str = "",
    ) -> None:
        counts = None
        mount: Callable[[], str] = lambda: prefix  # noqa: E731
        if limits is None:
            limits = {}
            try:
                if not _in_a_replica():
                    guard = Guard.here()
                    published = PublishedLimits(also=guard.store.refresh)
                    on_refused = on_refused or _counted_refusals()
                    counts = _keyed(published, guard)
                    published.start()
                    limits, mount = published, (lambda: published.prefix)
            except Exception:  # never the proxy's start: the ingress's gate still holds
                _log.exception("the proxy's admission gate is off")
        super().__init__(
            app,
            limits,
            on_refused=on_refused,
            pipeline=lambda scope: pipeline_below(mount(), scope),
            where="this proxy (summed over the ingress's replicas)",
            counts=counts,
        )

    def refusal_headers(self, scope: dict[str, Any]) -> dict[str, str]:
        """The request id, as every answer through Serve's proxy carries it: the caller's
        `x-request-id`, or a new one. The front door answers outside Serve's own
        `RequestIdMiddleware` (Serve puts that innermost), so it sets it itself."""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                return {"x-request-id": value.decode("latin-1")}
        return {"x-request-id": str(uuid.uuid4())}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == ADMISSION_PATH:
            # Whether this proxy gates; asked without a key, so it says nothing more.
            await json_answer(send, 200, {"gating": bool(self.limits)}, {})
            return
        await super().__call__(scope, receive, send)

    async def admitted(self, name: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Refusals first. Serve's proxy spends milliseconds of CPU on each request it
        # routes, a refusal a fraction of one, and a burst reaches the proxy over several
        # turns of its event loop (accepted and read in batches). So while this
        # pipeline's requests are being refused (one in the last turn), an admitted one
        # yields its turn: the refused callers of a burst are answered before the proxy
        # routes the admitted ones, not interleaved with them. At most
        # `REFUSALS_FIRST_S`, and only in a flood's first `FLOOD_FIRST_S`: refusals that
        # go on longer are lasting overload, not a burst, and an admitted request holding
        # its place idle would only cut the pipeline's throughput. Another pipeline's
        # refusals never hold it. A turn-based yield (`sleep(0)`), not a timed one: a
        # burst's refusals come in consecutive turns, and an idle loop ends the wait at
        # once.
        refusals = self.refusals[name]
        until = time.monotonic() + REFUSALS_FIRST_S
        while True:
            seen = refusals.count
            await asyncio.sleep(0)
            now = time.monotonic()
            if refusals.count == seen or now >= until:
                break
            if now >= refusals.flood_since + FLOOD_FIRST_S:
                break
        await self.app(scope, receive, send)


def _in_a_replica() -> bool:
    from ray.serve.context import _get_internal_replica_context

    return _get_internal_replica_context() is not None


def _keyed(published: PublishedLimits, guard: Guard) -> Callable[[dict[str, Any], str], bool]:
    """Whether a request's key is valid and has the pipeline's published scope: the
    replicas' own check (`Guard`, the same key store), on the keys as last read (the
    limits' reading thread re-reads the store, off the proxy's event loop), recording
    nothing (the ingress keeps the keys' last use, limits and usage). `guard`: this
    process's `Guard`."""
    failing = False

    def counts(scope: dict[str, Any], pipeline: str) -> bool:
        nonlocal failing
        if guard.settings.unsafe_disabled:
            return True
        needed = published.scopes.get(pipeline)
        key = bearer_key(scope)
        if needed is None or key is None:
            return False
        try:
            caller = guard.store.verify(key, refresh=False, touch=False)
        except Exception:  # the key store unreadable here: the ingress decides
            if not failing:
                _log.exception("the proxy cannot check keys; requests pass uncounted")
            failing = True
            return False
        failing = False
        return caller is not None and caller.allows(needed)

    return counts


def _counted_refusals() -> Callable[[str], None]:
    from servegraph.deploy.scaling.board import Reporter
    from servegraph.telemetry.metrics import ProxyRefusals

    refusals, demand = ProxyRefusals(), Reporter({})

    def refused(pipeline: str) -> None:
        refusals.refused(pipeline)
        demand.arrived(pipeline)

    return refused


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares it puts around its ASGI app (the last
    outermost: the front door refuses before anything else runs)."""
    return [Middleware(AnswerLostReplicas), Middleware(FrontDoor)]
