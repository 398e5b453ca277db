"""Reaching model servers on Ray Serve: deployment handles, created once and reused, and
the two faults turned into answers on the way (a full queue, a replica that died).
Used by the pipeline ingress and by every model server's gateway."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from servegraph._serve_status import serve_state
from servegraph.engine.runtime import time_left
from servegraph.errors import ServerUnavailableError
from servegraph.lang.catalog import Catalog, ServerSpec
from servegraph.lang.graph import resolve
from servegraph.serving.merging import MERGED_METHOD, CallMerger

logger = logging.getLogger("ray.serve")


def deployment_name(spec: ServerSpec) -> str:
    """A spec's deployment name (`ServerSpec.deployment_name`)."""
    return spec.deployment_name()


def _handle(spec: ServerSpec) -> DeploymentHandle:
    """The plain Serve handle of a server's deployment (Serve caches them)."""
    return serve.get_deployment_handle(deployment_name(spec), app_name=spec.name)


class MergeSettings(BaseSettings):
    """How concurrent calls to a model server are merged before the hop
    (`servegraph.serving.merging`); read from `SERVEGRAPH_MERGE_*`."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_MERGE_", extra="ignore")

    enabled: bool = Field(True, description="Merge calls to servers that accept it.")
    max_items: int = Field(64, ge=1, le=4096, description="The most requests one call carries.")
    max_calls: int = Field(
        4, ge=1, le=256, description="Merged calls in flight per server method and process."
    )
    max_pending: int = Field(
        1024, ge=1, description="Requests waiting to be sent past which a call is refused (503)."
    )


class ServeInvoker:
    """Reaches model servers through Serve deployment handles (created once, reused).

    Concurrent calls to the same method of a server that accepts merged calls
    (`ServerSpec.merged_calls`) travel as one handle call (`servegraph.serving.merging`); each
    keeps its own result, error, deadline, cancellation and retry.

    Two faults are turned into answers here, not bare errors:

    - a full queue (Serve's `BackPressureError`, from the server's bounded
      `max_queued_requests`) fails at once as `ServerUnavailableError` (503, with the
      server's Retry-After), so overload is shed rather than queued without bound;
    - a replica that dies mid-call (`RayActorError`) is retried, for idempotent methods,
      with capped exponential backoff until the node's deadline: Serve routes the retry
      to a live replica, or waits for the restarted one. Serve itself retries only
      requests that no replica had accepted yet.
    """

    def __init__(
        self,
        catalog: Catalog,
        merge: MergeSettings | None = None,
        replicas: RunningReplicas | None = None,
    ) -> None:
        self._catalog = catalog
        self._targets: dict[str, Any] = {}
        self._merge = merge if merge is not None else MergeSettings()
        self.mergers: dict[tuple[str, str], CallMerger] = {}
        self.replicas = replicas if replicas is not None else RunningReplicas(catalog)
        self._waking: set[str] = set()  # servers asked for a replica, not yet answered
        self._wakes: set[asyncio.Future[None]] = set()

    def prepare(self, servers: Iterable[str]) -> None:
        """Make the handles (and clients) of `servers` now, when the ingress starts:
        a client's first use may import much (the LLM's imports `ray.serve.llm`, and
        with it torch: over a second), which on the first request would hold the
        ingress's event loop, and every request in it, that long."""
        for server in servers:
            try:
                self._target(server)
            except Exception:  # not deployed yet (`serve deploy` builds apps in any
                # order): made on its first call instead, as before
                logger.warning("the handle of %r is made on its first call", server)

    def _target(self, server: str) -> Any:
        if server not in self._targets:
            spec = self._catalog[server]
            handle = _handle(spec)
            self._targets[server] = resolve(spec.client)(handle) if spec.client else handle
        return self._targets[server]

    async def __call__(self, server: str, method: str, request: BaseModel) -> Any:
        await self._startable_in_time(server)
        target = self._target(server)
        call: Callable[[], Awaitable[Any]]
        if not isinstance(target, DeploymentHandle):
            call = lambda: getattr(target, method)(request)  # noqa: E731
        elif (merger := self._merger(server, method, target)) is not None:
            left = time_left()
            deadline = None if left is None else time.monotonic() + left
            call = lambda: merger.submit(request, deadline)  # noqa: E731
        else:
            bound = getattr(target, method)
            call = lambda: cancel_when_abandoned(bound.remote(request))  # noqa: E731
        idempotent = self._catalog.contract(server, method).idempotent
        return await _retrying(server, call, lambda attempt: idempotent)

    def _merger(self, server: str, method: str, handle: DeploymentHandle) -> CallMerger | None:
        """The merger of calls to `server.method`, where the server accepts them."""
        if not (self._merge.enabled and self._catalog[server].merged_calls):
            return None
        key = (server, method)
        if key not in self.mergers:
            merged, alone = getattr(handle, MERGED_METHOD), getattr(handle, method)
            self.mergers[key] = CallMerger(
                server,
                lambda requests, left: merged.remote(method, requests, left),
                send_one=alone.remote,
                cancel=cancel_off_loop,
                max_items=self._merge.max_items,
                max_calls=self._merge.max_calls,
                max_pending=self._merge.max_pending,
            )
        return self.mergers[key]

    async def _startable_in_time(self, server: str) -> None:
        """Refuse a call to `server` at once (503, Retry-After its cold start) when no
        replica of it runs or is starting (scaled to zero) and the request's deadline
        leaves less than its `cold_start_s`: Serve's router would hold the call until a
        replica starts, and the caller would get a 504 after waiting out the whole
        deadline for nothing. A replica already starting may be nearly ready (Serve
        does not say since when), so calls then wait for it. The refused call still asks
        for a replica (`_wake`), so the next one finds it starting or running. A call
        that fits waits in Serve's queue for the start, which the queued call itself asks
        for."""
        cold_start_s = self._catalog[server].cold_start_s
        left = time_left()
        if cold_start_s is None or left is None or left >= cold_start_s:
            return
        if await self.replicas.live(server, left) != 0:
            return
        left = time_left() or 0.0  # after the read
        self._wake(server)
        raise ServerUnavailableError(
            server,
            f"no replica is running (scaled to zero) and one takes about {cold_start_s:g} s "
            f"to start, more than the {max(left, 0.0):.1f} s left before this call's "
            "deadline (the request's x-request-timeout, or its node's timeout); retry "
            "after the Retry-After header's seconds, or with a longer deadline",
            cold_start_s,
        )

    def _wake(self, server: str) -> None:
        """Ask Serve for a replica of `server` without doing any work on it: a health
        check call waits in the router's queue, and Serve's autoscaling starts one
        replica at once for a call waiting at zero (whatever the policy: its wrapper
        does it before asking the policy). One at a time per server; fire and forget.
        Sent outside this request's Serve context, so that the request ending (its
        answer, a client gone) does not cancel it as its child."""
        if server in self._waking:
            return
        try:
            handle = _handle(self._catalog[server])
            response = contextvars.Context().run(handle.check_health.remote)
        except Exception:  # the refusal stands; the next call asks again
            logger.warning("could not ask for a replica of %r", server, exc_info=True)
            return
        self._waking.add(server)
        task = asyncio.ensure_future(_settled(response))
        self._wakes.add(task)  # held until done: asyncio keeps only weak references

        def done(task: asyncio.Future[None]) -> None:
            self._wakes.discard(task)
            self._waking.discard(server)

        task.add_done_callback(done)

    async def read(self, server: str, method: str) -> Any:
        """An argument-less method (a gateway's GET route), retried like a call."""
        bound = getattr(self._target(server), method)
        return await _retrying(
            server,
            lambda: cancel_when_abandoned(bound.remote()),
            lambda attempt: attempt < _READ_RETRIES,
            f"gave up after {_READ_RETRIES} retries",
        )

    async def stream(self, server: str, method: str, request: BaseModel) -> AsyncIterator[Any]:
        """Iterate a streaming method: a generator on the replica, or the client's own.
        A stream whose replica died before its first item is started again."""
        await self._startable_in_time(server)
        target = self._target(server)
        idempotent = any(  # `method` is a contract's streaming twin
            c.idempotent
            for c in self._catalog[server].methods.values()
            if c.stream_method == method
        )
        for attempt in itertools.count():
            started = False
            try:
                if isinstance(target, DeploymentHandle):
                    items = getattr(target.options(stream=True), method).remote(request)
                else:
                    items = getattr(target, method)(request)
                try:
                    async for item in items:
                        started = True
                        yield item
                except (asyncio.CancelledError, GeneratorExit):
                    if isinstance(target, DeploymentHandle):
                        cancel_off_loop(items)  # see cancel_when_abandoned
                    raise
                return
            except BackPressureError as exc:
                raise _overloaded(server, exc) from exc
            except RayActorError as exc:
                await _before_retry(server, exc, attempt, idempotent and not started)


async def _settled(response: Any) -> None:
    """Await a fire-and-forget call, its outcome (or failure) dropped."""
    with contextlib.suppress(Exception):
        await response


class RunningReplicas:
    """How many replicas of each model server run or start, as Serve's controller says
    (`servegraph._serve_status`: what `serve.status()` says, at a small part of its
    CPU), for the servers that have a `cold_start_s`.

    Read from a thread, never on the event loop, and only when a call needs it (a
    deadline shorter than the server's cold start) and the count may have changed:

    - this process has not asked of the server for `idle_s` (or never has): it may
      have gone to zero since, as a server does only after a stretch without calls
      (Serve's `downscale_to_zero_delay_s`). The call waits for the read, at most
      `wait_s` or half the time it has left; a slower read counts as "unknown";
    - the last read found it at zero: read again in the background, at most every
      `fresh_s`, to see its replica start.

    A server this process keeps calling, last seen with a replica, is not read again,
    so the controller is not asked once a second for servers that never go to zero
    (every profile's `min_replicas` is 1 or more today). A failed or slow read is
    "unknown", and a call is never refused on it.

    By hand rather than from the handle's router, which knows its replicas: Serve
    offers no public way to ask it.
    """

    def __init__(
        self,
        catalog: Catalog,
        fresh_s: float = 1.0,
        idle_s: float = 5.0,
        wait_s: float = 1.0,
        status: Callable[[], Any] | None = None,
    ) -> None:
        self._catalog = catalog
        self.fresh_s, self.idle_s, self.wait_s = fresh_s, idle_s, wait_s
        self._status = status or serve_state
        self._counts: dict[str, int] = {}
        self._asked: dict[str, float] = {}  # server -> when last asked of (monotonic)
        self._read_at: dict[str, float] = {}  # server -> when a read that covered it ended
        self._reading: asyncio.Future[None] | None = None
        self._reading_since = 0.0

    async def live(self, server: str, left_s: float | None = None) -> int | None:
        """`server`'s replicas running or starting; None when unknown. `left_s`: the
        time the call has left (it waits at most half of it for a read)."""
        now = time.monotonic()
        asked, self._asked[server] = self._asked.get(server), now
        known = self._counts.get(server)
        if asked is not None and now - asked <= self.idle_s and known:
            return known  # called lately and running: it has not gone to zero since
        if now - self._read_at.get(server, -float("inf")) <= self.fresh_s:
            return known
        if self._reading is None:
            self._reading, self._reading_since = asyncio.ensure_future(self._read()), now
        read_age = now - self._read_at.get(server, -float("inf"))
        if known == 0 and read_age <= self.idle_s:
            return 0  # at zero a moment ago: refused on that, while a new read runs
        # Wait for the read no longer than `wait_s` from its start, nor than half of
        # what the call has left; a read slower than that is "unknown".
        wait_s = self.wait_s - (now - self._reading_since)
        if left_s is not None:
            wait_s = min(wait_s, max(left_s, 0.0) / 2)
        if wait_s <= 0:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), wait_s)
        except TimeoutError:
            return None
        return self._counts.get(server) if server in self._read_at else None

    async def _read(self) -> None:
        servers = list(self._asked)
        try:
            counts = await asyncio.get_running_loop().run_in_executor(
                None, self._read_counts, servers
            )
        except Exception as exc:  # unknown until the next read: never a refusal
            logger.warning("could not read the model servers' replicas: %s", exc)
            counts = {}
        finally:
            self._reading = None
        now = time.monotonic()
        for server in servers:
            self._read_at[server] = now
            if server in counts:
                self._counts[server] = counts[server]
            else:
                self._counts.pop(server, None)

    def _read_counts(self, servers: list[str]) -> dict[str, int]:
        apps = self._status().applications
        counts: dict[str, int] = {}
        for server in servers:
            spec = self._catalog[server]
            app = apps.get(spec.name)
            deployment = app.deployments.get(deployment_name(spec)) if app else None
            if spec.cold_start_s is None or deployment is None:
                continue  # unknown (not deployed yet, or being built): never refused
            states = deployment.replica_states
            counts[server] = sum(n for state, n in states.items() if state in _LIVE)
        return counts


# Replica states that will answer, now or once started: a replica in any of them means
# the server is not at zero (a restarting one is on its way; its start has begun).
_LIVE = frozenset({"RUNNING", "STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION"})

_REPLICA_RETRY_BACKOFF_S = (0.05, 2.0)  # first and largest wait between retries
_READ_RETRIES = 8  # a read has no node deadline: about 10 s of backoff in all


async def cancel_when_abandoned(response: Any) -> Any:
    """Await a handle call; if the awaiting task is cancelled (a deadline, a client gone),
    cancel the call on its replica too. Serve cancels a child call by itself only when
    the parent request is cancelled, not when its awaiting task is: without this, the
    work of a request answered 504 would run on, the LLM's generation included."""
    try:
        return await response
    except asyncio.CancelledError:
        cancel_off_loop(response)
        raise


# Two threads: cancels are rare but can each take a while under overload.
_CANCELLER = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="servegraph-cancel")


def cancel_off_loop(response: Any) -> None:
    """Cancel a handle call from a thread, never on the event loop. Serve's
    `DeploymentResponse.cancel()` is synchronous: it waits for the router (on its own
    loop) to settle the request's assignment and then calls `ray.cancel`. Called on the
    ingress's event loop for each of 128 requests timing out together, it held the loop
    for seconds, so every 504 left 6-10 s after its deadline (issue 23's overload burst,
    the ingress's access log) and requests waited in the replica before its app saw
    them. Fire and forget: a cancel is best effort in Serve too."""
    _CANCELLER.submit(response.cancel)


async def _retrying(
    server: str,
    call: Callable[[], Awaitable[Any]],
    may_retry: Callable[[int], bool],
    why_not: str = "the call is not safe to repeat",
) -> Any:
    """`call()`, repeated past replica deaths while `may_retry(attempt)`; a full queue
    fails at once."""
    for attempt in itertools.count():
        try:
            return await call()
        except BackPressureError as exc:
            raise _overloaded(server, exc) from exc
        except RayActorError as exc:
            await _before_retry(server, exc, attempt, may_retry(attempt), why_not)
    raise AssertionError("unreachable")


def _overloaded(server: str, exc: BackPressureError) -> ServerUnavailableError:
    return ServerUnavailableError(
        server, f"its queue is full: {exc}", getattr(exc, "_retry_after_s", None) or 1.0
    )


async def _before_retry(
    server: str,
    exc: BaseException,
    attempt: int,
    may_retry: bool,
    why_not: str = "the call is not safe to repeat",
) -> None:
    """Wait before repeating a call whose replica died, or raise if it must not be."""
    cause = f"its replica died mid-call ({type(exc).__name__})"
    if not may_retry:
        raise ServerUnavailableError(server, f"{cause}; {why_not}") from exc
    first, largest = _REPLICA_RETRY_BACKOFF_S
    delay = min(largest, first * 2**attempt)
    left = time_left()
    if left is not None and left <= delay:
        raise ServerUnavailableError(
            server, f"{cause}; retried {attempt} time(s), no replica answered in time"
        ) from exc
    logger.warning("%s: %s; retrying in %.2fs (attempt %d)", server, cause, delay, attempt + 1)
    await asyncio.sleep(delay)
