"""How the platform answers faults, without Ray: a full model server is a 503 naming
the node and never retried into; a dead replica is retried for idempotent calls within
the deadline; a caller's deadline header is answered just before it runs out."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from servegraph import (
    Catalog,
    InProcessRuntime,
    MethodContract,
    OverloadedError,
    Pipeline,
    ServerSpec,
)
from servegraph.engine.runtime import Runtime
from servegraph.errors import ServerUnavailableError
from servegraph.serving.handles import RunningReplicas, ServeInvoker
from servegraph.serving.http import retry_after
from servegraph.serving.ingress import run_deadline
from tests.servegraph import toy

CATALOG = Catalog(
    [
        ServerSpec(
            "safe", {"echo": MethodContract(toy.Text, toy.Echo, idempotent=True)}, "x:y", "S", "/s"
        ),
        ServerSpec("unsafe", {"echo": MethodContract(toy.Text, toy.Echo)}, "x:y", "U", "/u"),
    ]
)


class DiesFirst:
    """A server whose replica dies on its first `dies` calls."""

    def __init__(self, dies: int) -> None:
        self.dies = dies
        self.calls = 0

    async def echo(self, request: toy.Text) -> toy.Echo:
        self.calls += 1
        if self.calls <= self.dies:
            raise ActorDiedError()
        return toy.Echo(text=request.text)


class Full:
    def __init__(self) -> None:
        self.calls = 0

    async def echo(self, request: toy.Text) -> toy.Echo:
        self.calls += 1
        raise BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=2)


def invoker(**targets: Any) -> ServeInvoker:
    serve_invoker = ServeInvoker(CATALOG)
    serve_invoker._targets.update(targets)  # stand-ins for handles
    return serve_invoker


def echo_graph(server: str, **options: Any) -> Any:
    p = Pipeline(f"echo_{server}", input=toy.Text, output=toy.Echo)
    p.returns(p.call("say", server, "echo", text=p.input.text, **options))
    return p.build()


async def test_a_dead_replica_is_retried_for_an_idempotent_call() -> None:
    server = DiesFirst(dies=2)
    runtime = Runtime(CATALOG, invoker(safe=server))
    assert (await runtime.run(echo_graph("safe"), {"text": "hi"})).text == "hi"
    assert server.calls == 3


async def test_a_dead_replica_is_a_503_naming_the_node_when_the_call_is_unsafe() -> None:
    runtime = Runtime(CATALOG, invoker(unsafe=DiesFirst(dies=1)))
    with pytest.raises(OverloadedError) as info:
        await runtime.run(echo_graph("unsafe"), {"text": "hi"})
    assert info.value.node == "say" and info.value.status_code == 503
    assert "replica died" in info.value.detail and "not safe to repeat" in info.value.detail


async def test_retries_stop_at_the_deadline_with_a_503_that_says_why() -> None:
    runtime = Runtime(CATALOG, invoker(safe=DiesFirst(dies=10_000)))
    started = time.monotonic()
    with pytest.raises(OverloadedError) as info:
        await runtime.run(echo_graph("safe"), {"text": "hi"}, deadline_s=1.0)
    assert time.monotonic() - started < 1.0
    assert info.value.node == "say" and "no replica answered in time" in info.value.detail


async def test_a_full_server_is_a_503_at_once_never_retried_into() -> None:
    full = Full()
    runtime = Runtime(CATALOG, invoker(safe=full))
    graph = echo_graph("safe", idempotent=True, retries=3)
    with pytest.raises(OverloadedError) as info:
        await runtime.run(graph, {"text": "hi"})
    assert full.calls == 1
    assert info.value.node == "say" and "queue is full" in info.value.detail
    assert retry_after(info.value) == {"Retry-After": "2"}


async def test_in_process_servers_raising_unavailable_are_named_too() -> None:
    class Gone:
        async def echo(self, request: toy.Text) -> toy.Echo:
            raise ServerUnavailableError("safe", "restarting")

    runtime = InProcessRuntime(CATALOG, {"safe": Gone()})
    with pytest.raises(OverloadedError) as info:
        await runtime.run(echo_graph("safe"), {"text": "hi"})
    assert info.value.node == "say" and "restarting" in info.value.detail


def test_a_named_deadline_is_answered_just_before_it_runs_out() -> None:
    graph = echo_graph("safe")
    assert run_deadline(graph) == 60.0  # the default, when none is named
    assert run_deadline(graph, 20.0, None) == pytest.approx(19.75)
    assert run_deadline(graph, None, 20.0) == pytest.approx(19.75)
    assert run_deadline(graph, 30.0, 10.0) == pytest.approx(9.75)  # the tighter one
    assert run_deadline(graph, 1.0, None) == pytest.approx(0.9)


class StreamDiesFirst:
    """A streaming twin whose replica dies before its first chunk, `dies` times."""

    def __init__(self, dies: int) -> None:
        self.dies = dies
        self.calls = 0

    async def write_stream(self, request: toy.Text):
        self.calls += 1
        if self.calls <= self.dies:
            raise ActorDiedError()
        yield toy.Piece(text=request.text)
        yield toy.Echo(text=request.text)


async def test_a_stream_whose_replica_died_before_its_first_chunk_is_started_again() -> None:
    catalog = Catalog(
        [
            ServerSpec(
                "writer",
                {
                    "write": MethodContract(
                        toy.Text,
                        toy.Echo,
                        chunk=toy.Piece,
                        stream_method="write_stream",
                        idempotent=True,
                    )
                },
                "x:y",
                "W",
                "/w",
            )
        ]
    )
    server = StreamDiesFirst(dies=1)
    serve_invoker = ServeInvoker(catalog)
    serve_invoker._targets["writer"] = server
    items = [
        item async for item in serve_invoker.stream("writer", "write_stream", toy.Text(text="x"))
    ]
    assert items == [toy.Piece(text="x"), toy.Echo(text="x")] and server.calls == 2


def _status(state: str | None) -> Any:
    """Serve's status as `serve.status()` gives it, for a server "cold" (deployment C)
    with one replica in `state` (None: none)."""
    states = {state: 1} if state else {}
    deployments = {"C": SimpleNamespace(replica_states=states)}
    return SimpleNamespace(applications={"cold": SimpleNamespace(deployments=deployments)})


COLD = Catalog(
    [
        ServerSpec(
            "cold",
            {"echo": MethodContract(toy.Text, toy.Echo, idempotent=True)},
            "x:y",
            "C",
            "/c",
            cold_start_s=10.0,
        )
    ]
)


@pytest.mark.parametrize(
    ("state", "deadline_s", "refused"),
    [(None, 2.0, True), (None, 30.0, False), ("RUNNING", 2.0, False), ("STARTING", 2.0, False)],
)
async def test_a_server_at_zero_refuses_at_once_a_call_its_cold_start_cannot_fit(
    monkeypatch: pytest.MonkeyPatch, state: str | None, deadline_s: float, refused: bool
) -> None:
    """Scaled to zero with 2 s left and a 10 s start: a 503 naming the node at once, with
    the start as Retry-After, and a replica asked for; with 30 s left the call waits for
    the start (Serve's queue: here the stand-in answers); a replica running, or starting
    (maybe nearly ready): the call goes on."""
    woken: list[str] = []
    monkeypatch.setattr(ServeInvoker, "_wake", lambda self, server: woken.append(server))
    serve_invoker = ServeInvoker(
        COLD, replicas=RunningReplicas(COLD, status=lambda: _status(state))
    )
    serve_invoker._targets["cold"] = DiesFirst(dies=0)
    runtime = Runtime(COLD, serve_invoker)
    started = time.monotonic()
    if not refused:
        answer = await runtime.run(echo_graph("cold"), {"text": "hi"}, deadline_s=deadline_s)
        assert answer.text == "hi" and woken == []
        return
    with pytest.raises(OverloadedError) as info:
        await runtime.run(echo_graph("cold"), {"text": "hi"}, deadline_s=deadline_s)
    assert time.monotonic() - started < 1.0
    assert info.value.node == "say" and info.value.status_code == 503
    assert "scaled to zero" in info.value.detail and "x-request-timeout" in info.value.detail
    assert retry_after(info.value) == {"Retry-After": "10"}
    assert woken == ["cold"]


async def test_replicas_unknown_after_a_failed_read_never_refuse() -> None:
    def broken() -> Any:
        raise ConnectionError("controller restarting")

    replicas = RunningReplicas(COLD, status=broken)
    assert await replicas.live("cold") is None


async def test_a_server_called_lately_and_running_is_not_read_again() -> None:
    reads: list[int] = []

    def status() -> Any:
        reads.append(1)
        return _status("RUNNING")

    replicas = RunningReplicas(COLD, status=status)
    assert [await replicas.live("cold") for _ in range(50)] == [1] * 50
    assert len(reads) == 1  # the controller is asked once, not per call


async def test_a_slow_controller_is_unknown_after_a_bounded_wait() -> None:
    import threading

    release = threading.Event()

    def slow() -> Any:
        release.wait(10)
        return _status(None)

    replicas = RunningReplicas(COLD, wait_s=0.05, status=slow)
    started = time.monotonic()
    try:
        assert await replicas.live("cold") is None
        assert await replicas.live("cold") is None  # no second wait on the same read
        assert time.monotonic() - started < 1.0
    finally:
        release.set()


async def test_at_zero_calls_are_refused_on_the_last_count_while_a_new_read_runs() -> None:
    import asyncio
    import threading

    release, reads = threading.Event(), []

    def status() -> Any:
        reads.append(1)
        if len(reads) > 1:
            release.wait(10)  # the second read hangs: the controller is slow
        return _status(None)

    replicas = RunningReplicas(COLD, fresh_s=0.0, wait_s=0.05, status=status)
    try:
        assert await replicas.live("cold") == 0
        assert await replicas.live("cold") == 0  # and a second read starts
        for _ in range(500):  # bounded wait until it runs (in the executor's thread)
            if len(reads) == 2:
                break
            await asyncio.sleep(0.01)
        assert [await replicas.live("cold") for _ in range(3)] == [0, 0, 0]
        await asyncio.sleep(0.05)
        assert len(reads) == 2  # one read in flight, not one per call
        # The zero grows old while the read hangs: past `idle_s` it is no longer
        # believed, and the call is not refused on it ("unknown").
        replicas.idle_s = 0.1
        await asyncio.sleep(0.15)
        assert await replicas.live("cold") is None
    finally:
        release.set()
