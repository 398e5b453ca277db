"""Streamed runs: a `stream=True` call forwards its chunks as they come, the rest of the
graph still gets the complete response, and a stream is never replayed by a retry."""

from __future__ import annotations

import asyncio

import pytest

from servegraph import InProcessRuntime, NodeFailedError, Pipeline, RunEvent
from servegraph.errors import GraphValidationError
from servegraph.lang.validation import validate
from tests.servegraph import toy


async def collect(runtime: InProcessRuntime, graph, request) -> list[RunEvent]:
    return [event async for event in runtime.stream(graph, request)]


async def test_stream_sends_chunks_then_node_events_then_the_result() -> None:
    writer = toy.Writer()
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(writer=writer))
    events = await collect(runtime, toy.written().build(), {"text": "one two three"})

    kinds = [(e.kind, e.node) for e in events]
    assert kinds == [
        ("chunk", "draft"),
        ("chunk", "draft"),
        ("chunk", "draft"),
        ("node", "draft"),
        ("node", "shout"),
        ("result", None),
    ]
    assert "".join(e.data.text for e in events if e.kind == "chunk") == "one two three"
    assert events[-1].data.output == "ONE TWO THREE"  # downstream got the whole response
    assert writer.calls == ["write_stream"]


async def test_a_plain_run_calls_the_plain_method() -> None:
    writer = toy.Writer()
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(writer=writer))
    assert await runtime.run(toy.written().build(), {"text": "a b"}) == "A B"
    assert writer.calls == ["write"]


async def test_a_stream_that_broke_before_any_chunk_is_retried() -> None:
    writer = toy.Writer(fail_after=0)
    graph = toy.written(idempotent=True, retries=2).build()
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(writer=writer))
    events = await collect(runtime, graph, {"text": "x y"})
    assert events[-1].data.output == "X Y"
    assert writer.calls == ["write_stream", "write_stream"]
    assert [e.data.status for e in events if e.kind == "node" and e.node == "draft"] == [
        "error",
        "ok",
    ]


async def test_a_stream_that_broke_after_sending_chunks_is_not_replayed() -> None:
    writer = toy.Writer(fail_after=1)
    graph = toy.written(idempotent=True, retries=2).build()
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(writer=writer))
    seen: list[RunEvent] = []
    with pytest.raises(NodeFailedError, match="stream broke after 1") as caught:
        async for event in runtime.stream(graph, {"text": "x y"}):
            seen.append(event)
    assert caught.value.node == "draft"
    assert [e.kind for e in seen] == ["chunk", "node"]  # the chunk it sent, then the failure
    assert writer.calls == ["write_stream"]


async def test_closing_the_stream_early_cancels_the_run() -> None:
    p = Pipeline("slow", input=toy.Text, output=str)
    draft = p.call("draft", "writer", "write", text=p.input.text, stream=True)
    slow = p.function("slow", toy.slow_upper, text=draft.text, seconds=30)
    p.returns(slow)
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    events = runtime.stream(p.build(), {"text": "x"})
    first = await anext(events)
    assert first.kind == "chunk"
    await asyncio.wait_for(events.aclose(), 1)  # would wait 30 s if the run went on
    leftover = [t for t in asyncio.all_tasks() if "slow_upper" in repr(t.get_coro())]
    assert not [t for t in leftover if not t.done()]


def test_stream_on_a_method_that_cannot_stream_is_a_validation_problem() -> None:
    p = Pipeline("bad", input=toy.Text, output=toy.Vector)
    p.returns(p.call("embed", "embedder", "embed", text=p.input.text, stream=True))
    with pytest.raises(GraphValidationError) as caught:
        validate(p.build(), toy.CATALOG)
    (problem,) = caught.value.problems
    assert problem.node == "embed" and "cannot stream" in problem.message
