"""Batch before the hop: concurrent calls from one process to the same method of the same
model server travel as one handle call carrying many requests, and are split again on
return (`CallMerger`, the caller's side); the replica runs each request as it would a
call of its own (`accepts_merged_calls`, the server's side), so its `Batcher` merges the
items of many merged calls into one forward pass as it merges single calls.

Why by hand: Ray Serve batches on the replica (`@serve.batch`; our `Batcher`), never on
the caller. Every `handle.method.remote()` is its own Serve request: routed, pickled,
scheduled as a Ray actor task, tracked and answered on its own, which costs about a
millisecond of CPU in the caller and as much again in the replica, per item. A GPU
encoder answers 64 items in a few milliseconds, so that per-call price, not the model,
was what bounded the platform (issue 22: 589 items/s by handle against 6,543 for the
raw model on one H200).

Each item keeps what is its own: its result or its error (an item that fails fails
only itself), its cancellation (a cancelled item is dropped before it is sent, or its
result discarded after; the handle call is cancelled once every item in it is), its
deadline (its caller stops waiting when it is up, and the replica skips an item whose
time is up when it gets to it) and its retry
(a replica that dies fails every item of the call with `RayActorError`, and each
caller's own retry loop decides, with its own deadline, whether to send it again). Its
span and cost record stay its own too: the runtime records a node per item, and the
replica meters each item as a call of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from servegraph.errors import ServerUnavailableError

MERGED_METHOD = "call_many"
"""The replica method a merged call reaches (added by `accepts_merged_calls`)."""


class ItemError:
    """One item's failure, returned in its place so that the other items' results
    still come back. Pickles the error itself when it can, else its type and text."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        try:
            pickle.dumps(self.error)
        except Exception:
            return (ItemError, (RuntimeError(f"{type(self.error).__name__}: {self.error}"),))
        return (ItemError, (self.error,))


@dataclass
class _Item:
    request: Any
    future: asyncio.Future[Any]
    deadline: float | None  # time.monotonic() of the caller, or None
    context: contextvars.Context  # the caller's: its trace, its Serve request


@dataclass
class MergeStats:
    """What a merger sent so far: handle calls and the items they carried."""

    calls: int = 0
    items: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class CallMerger:
    """Merges concurrent `submit`s (one request each) into calls of `send` (a list of
    requests and their seconds left -> an awaitable list of results or `ItemError`s).

    A request goes out at once (on the next turn of the event loop, with whatever else
    arrived in the same turn) while fewer than `max_calls` merged calls are in flight;
    past that, requests wait for the next call to come back and leave together, up to
    `max_items` a call. So an idle server sees no added wait and a busy one gets few,
    large calls. An item whose deadline passes fails with `TimeoutError` at once,
    whatever the rest of its call waits for; once every item of a call is done so, the
    call is cancelled. More than `max_pending` waiting is refused at once
    (`ServerUnavailableError`, a 503 naming the server): the caller's queue is bounded
    as the replica's is.

    A call that carries one request goes as that request's own call (`send_one`, in
    its caller's context: its trace, its Serve request, its method's name); a merged
    call carries the trace of its first request (OpenTelemetry's context only, not the
    caller's Serve request, whose cancellation must not cancel the others' items).

    Args:
        server: the model server, for errors.
        send: starts the merged call; what it returns is awaited, and cancelled when
            every item in it was.
        send_one: starts a call of one request (default: `send` with a list of one).
        cancel: how to cancel what `send` returned (default: its `.cancel()`).
    """

    def __init__(
        self,
        server: str,
        send: Callable[[list[Any], list[float | None]], Any],
        *,
        max_items: int = 64,
        max_calls: int = 4,
        max_pending: int = 1024,
        send_one: Callable[[Any], Any] | None = None,
        cancel: Callable[[Any], None] | None = None,
    ) -> None:
        if max_items < 1 or max_calls < 1 or max_pending < 1:
            raise ValueError("max_items, max_calls and max_pending must be at least 1")
        self.server = server
        self._send = send
        self._send_one = send_one
        self._cancel = cancel or _cancel
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps tasks weakly
        self.max_items = max_items
        self.max_calls = max_calls
        self.max_pending = max_pending
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
        self._scheduled = False
        self.stats = MergeStats()

    async def submit(self, request: Any, deadline: float | None = None) -> Any:
        """`request`'s own result (or its own error), whoever it travelled with.
        `deadline` (`time.monotonic()`) lets the replica skip it once its time is up."""
        if len(self._queue) >= self.max_pending:
            raise ServerUnavailableError(
                self.server, f"{len(self._queue)} calls are already waiting to be sent", 1.0
            )
        loop = asyncio.get_running_loop()
        item = _Item(request, loop.create_future(), deadline, contextvars.copy_context())
        self._queue.append(item)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        expiry = None
        if deadline is not None:  # its own deadline, whatever the others in its call wait for
            expiry = loop.call_at(loop.time() + deadline - time.monotonic(), _expire, item)
        try:
            return await item.future
        except asyncio.CancelledError:
            item.future.cancel()  # still queued: skipped; already sent: result dropped
            raise
        finally:
            if expiry is not None:
                expiry.cancel()

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < self.max_calls:
            batch = self._take()
            if not batch:
                break
            self._in_flight += 1
            # An empty context: the call belongs to no single caller's request, so that
            # Serve's cancellation of one request (its client gone) cannot cancel the
            # call that carries the others' items.
            task = loop.create_task(self._call(batch, loop), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_items:
            item = self._queue.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    async def _call(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        self._record(len(batch))
        abandon = None
        try:
            response, one = self._start(batch)
            if hasattr(response, "cancel"):
                abandon = functools.partial(
                    _cancel_when_all_done, batch, functools.partial(self._cancel, response)
                )
                for item in batch:
                    item.future.add_done_callback(abandon)
            try:
                results = [await response] if one else await response
            finally:
                if abandon is not None:  # answered: nothing left to cancel
                    for item in batch:
                        item.future.remove_done_callback(abandon)
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results came back for {len(batch)} items")
        except asyncio.CancelledError:
            # Not the callers' cancellations (those only drop their items): the call's
            # own (Serve cancelling its assignment) or this task's, at shutdown.
            unavailable = ServerUnavailableError(self.server, "its call was cancelled", 1.0)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(unavailable)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception as exc:  # the whole call failed: so did each of its items
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue  # its caller has gone
                if isinstance(result, ItemError):
                    item.future.set_exception(result.error)
                else:
                    item.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._flush(loop)

    def _start(self, batch: list[_Item]) -> tuple[Any, bool]:
        """Start the call: (what to await, whether it answers one request bare)."""
        first = batch[0]
        if len(batch) == 1 and self._send_one is not None:
            return first.context.run(self._send_one, first.request), True
        now = time.monotonic()
        left = [None if i.deadline is None else i.deadline - now for i in batch]
        requests = [i.request for i in batch]
        trace = _trace_of(first.context)
        if trace is None:
            return self._send(requests, left), False
        from opentelemetry import context as otel

        token = otel.attach(trace)
        try:
            return self._send(requests, left), False
        finally:
            otel.detach(token)

    def _record(self, size: int) -> None:
        stats = self.stats
        stats.calls += 1
        stats.items += size
        stats.largest = max(stats.largest, size)
        stats.sizes[size] = stats.sizes.get(size, 0) + 1


def _trace_of(context: contextvars.Context) -> Any:
    """The OpenTelemetry context current in `context` (None without OpenTelemetry)."""
    try:
        from opentelemetry import context as otel
    except ImportError:  # pragma: no cover - tracing not installed
        return None
    return context.run(otel.get_current)


def _cancel(response: Any) -> None:
    response.cancel()  # a handle call's: see servegraph.serving.handles.cancel_off_loop


def _cancel_when_all_done(batch: list[_Item], cancel: Callable[[], None], _: object) -> None:
    """Nobody waits for the call any more (every item cancelled or past its deadline)."""
    if all(item.future.done() for item in batch):
        cancel()


def _expire(item: _Item) -> None:
    if not item.future.done():
        item.future.set_exception(TimeoutError("its deadline passed before the server answered"))


# ------------------------------------------------------------------- the replica's side

_merged: contextvars.ContextVar[bool] = contextvars.ContextVar("servegraph_merged", default=False)


class CallCounts:
    """What reached a replica: calls (handle calls: a merged call counts once) and the
    items they carried (a direct call is one)."""

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0
        self.lock = threading.Lock()  # sync methods count from Serve's and our threads

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "items": self.items}


def accepts_merged_calls(methods: Iterable[str]) -> Callable[[type], type]:
    """Class decorator for a model server's Serve deployment: adds `call_many(method,
    requests, seconds_left)`, which runs each request as `method(request)` would run
    alone (concurrently, so the server's batching merges them) and returns each one's
    result or `ItemError`, and `call_counts()`, the calls and items that reached the
    replica (with its id). Only the contract's `methods` may be called this way."""
    allowed = frozenset(methods)

    def decorate(cls: type) -> type:
        for name in allowed:
            setattr(cls, name, _counted(getattr(cls, name)))

        async def call_many(
            self: Any, method: str, requests: list[Any], seconds_left: list[float | None]
        ) -> list[Any]:
            if method not in allowed:
                raise ValueError(f"{method!r} cannot be called merged; choose from {allowed}")
            return await _run_merged(self, method, requests, seconds_left)

        def call_counts(self: Any) -> dict[str, Any]:
            return {"replica": _replica_id(), **_counts(self).as_dict()}

        cls.call_many = call_many  # type: ignore[attr-defined]
        cls.call_counts = call_counts  # type: ignore[attr-defined]
        return cls

    return decorate


# The functions below are module-level on purpose: Ray pickles a deployment class's
# methods by value, with what they reference, and a ContextVar cannot be pickled.


async def _run_merged(
    replica: Any, method: str, requests: list[Any], seconds_left: list[float | None]
) -> list[Any]:
    counts = _counts(replica)
    with counts.lock:
        counts.calls += 1
    bound = getattr(replica, method)
    token = _merged.set(True)  # the tasks below copy it: their items are not calls
    try:
        return await asyncio.gather(
            *(_one(bound, r, left) for r, left in zip(requests, seconds_left, strict=True))
        )
    finally:
        _merged.reset(token)


async def _one(bound: Callable[[Any], Any], request: Any, left: float | None) -> Any:
    try:
        if left is not None and left <= 0:
            raise TimeoutError("its deadline passed before the replica got to it")
        if inspect.iscoroutinefunction(bound):
            work = bound(request)
        else:  # Serve would run a sync method in its thread pool: so do we
            work = asyncio.to_thread(bound, request)
        return await (work if left is None else asyncio.wait_for(work, left))
    except Exception as exc:
        return ItemError(exc)


def _replica_id() -> str:
    """The Serve replica's id, or "in-process" outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return "in-process"


_CREATING = threading.Lock()


def _counts(replica: Any) -> CallCounts:
    counts = replica.__dict__.get("_servegraph_calls")
    if counts is None:
        with _CREATING:
            counts = replica.__dict__.setdefault("_servegraph_calls", CallCounts())
    return counts


def _counted(method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def counted_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            _count(self)
            return await method(self, *args, **kwargs)

        return counted_async

    @functools.wraps(method)
    def counted_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        _count(self)
        return method(self, *args, **kwargs)

    return counted_sync


def _count(replica: Any) -> None:
    counts = _counts(replica)
    with counts.lock:
        counts.items += 1
        if not _merged.get():
            counts.calls += 1
