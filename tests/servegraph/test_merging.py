"""Batch before the hop (`servegraph.serving.merging`): concurrent calls merged into one call and
split again keep each item's own result, error, cancellation and deadline. The server
side is the real `accepts_merged_calls` on a plain class; the hop is a task in this
process standing in for the handle call."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import pytest
from pydantic import BaseModel

from servegraph.errors import InvalidInputError, ServerUnavailableError
from servegraph.serving.merging import CallMerger, ItemError, accepts_merged_calls


class Text(BaseModel):
    text: str


class Length(BaseModel):
    n: int


@accepts_merged_calls(["measure", "measure_sync"])
class Server:
    """Fails on "bad", waits on "slow", and records every batch it was asked for."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.release = asyncio.Event()

    async def measure(self, request: Text) -> Length:
        self.seen.append(request.text)
        if request.text == "bad":
            raise InvalidInputError("text", "is bad", "send a good one")
        if request.text.startswith("slow"):
            await self.release.wait()
        return Length(n=len(request.text))

    def measure_sync(self, request: Text) -> Length:
        return Length(n=len(request.text))


class Hop:
    """`send` for a merger: runs `call_many` in a task, as a handle call runs remotely
    (cancellable, awaitable), and counts the calls."""

    def __init__(self, server: Server, method: str = "measure") -> None:
        self.server = server
        self.method = method
        self.calls: list[int] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def __call__(self, requests: list[Any], left: list[float | None]) -> asyncio.Task[Any]:
        self.calls.append(len(requests))
        # Through pickle, as Ray would carry them.
        requests, left = pickle.loads(pickle.dumps((requests, left)))
        task = asyncio.ensure_future(self._call(requests, left))
        self.tasks.append(task)
        return task

    async def _call(self, requests: list[Any], left: list[float | None]) -> list[Any]:
        results = await self.server.call_many(self.method, requests, left)  # type: ignore[attr-defined]
        return pickle.loads(pickle.dumps(results))


async def test_64_concurrent_calls_travel_in_few_calls_each_with_its_own_result() -> None:
    hop = Hop(Server())
    merger = CallMerger("toy", hop, max_calls=2)
    texts = ["x" * i for i in range(1, 65)]
    lengths = await asyncio.gather(*(merger.submit(Text(text=t)) for t in texts))
    assert [r.n for r in lengths] == list(range(1, 65))
    assert sum(hop.calls) == 64
    assert len(hop.calls) <= 64 // 4, hop.calls
    assert merger.stats.calls == len(hop.calls) and merger.stats.items == 64
    counts = hop.server.call_counts()  # type: ignore[attr-defined]
    assert counts == {"replica": "in-process", "calls": len(hop.calls), "items": 64}


async def test_a_failing_item_among_63_good_ones_fails_only_itself() -> None:
    hop = Hop(Server())
    merger = CallMerger("toy", hop, max_calls=1)
    texts = ["good"] * 31 + ["bad"] + ["good"] * 32
    results = await asyncio.gather(
        *(merger.submit(Text(text=t)) for t in texts), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(results[31], InvalidInputError)
    assert results[31].field == "text"  # the server's own error, pickled back whole
    assert all(r == Length(n=4) for i, r in enumerate(results) if i != 31)


async def test_sync_methods_run_merged_too() -> None:
    hop = Hop(Server(), "measure_sync")
    merger = CallMerger("toy", hop)
    results = await asyncio.gather(*(merger.submit(Text(text="ab" * i)) for i in range(8)))
    assert [r.n for r in results] == [2 * i for i in range(8)]


async def test_a_cancelled_item_fails_only_itself_and_the_call_goes_on() -> None:
    server = Server()
    hop = Hop(server)
    merger = CallMerger("toy", hop, max_calls=1)
    calls = [asyncio.ensure_future(merger.submit(Text(text=f"slow{i}"))) for i in range(8)]
    while not hop.calls:
        await asyncio.sleep(0)
    calls[3].cancel()
    server.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert [r.n for i, r in enumerate(results) if i != 3] == [5] * 7  # type: ignore[union-attr]
    assert not hop.tasks[0].cancelled()


async def test_the_call_is_cancelled_once_every_item_in_it_is() -> None:
    server = Server()
    hop = Hop(server)
    merger = CallMerger("toy", hop, max_calls=1)
    calls = [asyncio.ensure_future(merger.submit(Text(text=f"slow{i}"))) for i in range(4)]
    while not hop.calls:
        await asyncio.sleep(0)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.wait(hop.tasks)
    assert hop.tasks[0].cancelled()


async def test_a_call_that_answered_is_never_cancelled() -> None:
    hop = Hop(Server())
    merger = CallMerger("toy", hop)
    await asyncio.gather(*(merger.submit(Text(text="a")) for _ in range(4)))
    assert not any(task.cancelled() for task in hop.tasks)


async def test_a_queued_cancelled_item_is_never_sent() -> None:
    server = Server()
    hop = Hop(server)
    merger = CallMerger("toy", hop, max_calls=1)
    first = asyncio.ensure_future(merger.submit(Text(text="slow-first")))
    while not hop.calls:
        await asyncio.sleep(0)
    queued = [asyncio.ensure_future(merger.submit(Text(text=f"q{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    queued[1].cancel()
    server.release.set()
    results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert "q1" not in server.seen and {"q0", "q2"} <= set(server.seen)


async def test_items_with_different_deadlines_each_keep_their_own() -> None:
    server = Server()
    hop = Hop(server)
    merger = CallMerger("toy", hop, max_calls=1)
    now = time.monotonic()
    past = merger.submit(Text(text="late"), deadline=now - 1)  # over before it is sent
    short = merger.submit(Text(text="slow-short"), deadline=now + 0.05)
    none = merger.submit(Text(text="slow-none"))
    long = merger.submit(Text(text="slow-long"), deadline=now + 60)
    calls = [asyncio.ensure_future(c) for c in (past, short, none, long)]
    # The short one's deadline passes while the others in its call still wait.
    await asyncio.wait(calls[:2], return_when=asyncio.ALL_COMPLETED)
    assert isinstance(calls[0].exception(), TimeoutError)
    assert isinstance(calls[1].exception(), TimeoutError)
    assert not calls[2].done() and not calls[3].done()
    server.release.set()
    assert (await calls[2]).n == 9 and (await calls[3]).n == 9
    assert "late" not in server.seen  # the replica skipped it, never ran it


async def test_a_failed_call_fails_each_of_its_items_with_the_calls_error() -> None:
    class Died(Exception):
        pass

    async def dead(requests: list[Any]) -> list[Any]:
        raise Died("the replica died")

    merger = CallMerger("toy", lambda requests, left: dead(requests))
    results = await asyncio.gather(
        *(merger.submit(Text(text="a")) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, Died) for r in results)
    # ...and the merger still works afterwards.
    hop = Hop(Server())
    merger._send = hop
    assert (await merger.submit(Text(text="abc"))).n == 3


async def test_past_max_pending_a_call_is_refused_at_once_naming_the_server() -> None:
    server = Server()
    hop = Hop(server)
    merger = CallMerger("toy", hop, max_calls=1, max_pending=2)
    waiting = [asyncio.ensure_future(merger.submit(Text(text="slow-first")))]
    while not hop.calls:  # the first is sent; two more wait
        await asyncio.sleep(0)
    waiting += [asyncio.ensure_future(merger.submit(Text(text=f"slow{i}"))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ServerUnavailableError, match="toy"):
        await merger.submit(Text(text="one too many"))
    server.release.set()
    assert len(await asyncio.gather(*waiting)) == 3


def test_an_unpicklable_error_comes_back_as_its_type_and_text() -> None:
    class Local(Exception):  # defined in a function: pickle cannot find it
        pass

    error = pickle.loads(pickle.dumps(ItemError(Local("no way"))))
    assert isinstance(error.error, RuntimeError) and str(error.error) == "Local: no way"


async def test_only_the_contracts_methods_can_be_called_merged() -> None:
    with pytest.raises(ValueError, match="cannot be called merged"):
        await Server().call_many("__init__", [None], [None])  # type: ignore[attr-defined]


async def test_a_handle_call_is_cancelled_off_the_event_loop() -> None:
    """Serve's `DeploymentResponse.cancel()` blocks (it settles the request's assignment,
    then calls `ray.cancel`): it must never run on the loop that answers requests."""
    import threading

    from servegraph.serving.handles import cancel_when_abandoned

    loop_thread = threading.get_ident()
    cancelled_on: list[int] = []
    done = threading.Event()

    class Response:
        def __await__(self):  # type: ignore[no-untyped-def]
            return asyncio.get_running_loop().create_future().__await__()  # never answers

        def cancel(self) -> None:
            cancelled_on.append(threading.get_ident())
            done.set()

    call = asyncio.ensure_future(cancel_when_abandoned(Response()))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await asyncio.to_thread(done.wait, 30)
    assert cancelled_on and cancelled_on[0] != loop_thread


async def test_a_lone_request_goes_as_its_own_call_in_its_callers_context() -> None:
    import contextvars

    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="nobody")
    seen: list[str] = []

    async def alone(request: Text) -> Length:
        return Length(n=len(request.text))

    def send_one(request: Text) -> asyncio.Task[Length]:
        seen.append(caller.get())  # Serve reads the trace and request context here
        return asyncio.ensure_future(alone(request))

    hop = Hop(Server())
    merger = CallMerger("toy", hop, send_one=send_one)

    async def as_caller(name: str) -> Length:
        caller.set(name)
        return await merger.submit(Text(text=name))

    assert (await as_caller("ana")).n == 3
    assert seen == ["ana"] and hop.calls == []  # no merged call for a lone request


async def test_a_call_cancelled_under_its_items_is_a_503_for_each_not_their_cancellation() -> None:
    def send(requests: list[Any], left: list[float | None]) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        future.cancel()  # as Serve does when it gives up assigning the request
        return future

    merger = CallMerger("toy", send)
    results = await asyncio.gather(
        *(merger.submit(Text(text="a")) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ServerUnavailableError) for r in results), results
