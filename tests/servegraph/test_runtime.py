from __future__ import annotations

import pytest
from pydantic import BaseModel

from servegraph import (
    Catalog,
    CatalogError,
    InProcessRuntime,
    MethodContract,
    NodeFailedError,
    NodeInputError,
    NodeTimeoutError,
    Pipeline,
    ServerSpec,
)
from tests.servegraph import toy


async def test_rag_shaped_graph_runs_in_process() -> None:
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    answer = await runtime.run(toy.rag().build(), {"question": "hello", "k": 2})
    assert answer == toy.Answer(answer="hello -> doc0:5", sources=["doc0:5", "doc1:5"])


async def test_switch_routes_on_classifier_label() -> None:
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    graph = toy.routed().build()
    assert await runtime.run(graph, {"text": "an invoice"}) == "AN INVOICE"
    result = await runtime.execute(graph, {"text": "Crash Report"})
    assert result.output == "crash report"
    assert [r.node for r in result.nodes] == [
        "classify",
        "route/case[technical]/transform",
        "route",
    ]


async def test_independent_branches_run_concurrently() -> None:
    # Each branch waits until it sees the other running: run serially, both would fail.
    toy.ARRIVED.clear()
    p = Pipeline("fan", input=toy.Text, output=str)
    a = p.function("a", toy.rendezvous, text=p.input.text, me="a", other="b")
    b = p.function("b", toy.rendezvous, text=p.input.text, me="b", other="a")
    p.returns(p.function("join", toy.join_two, upper=a, lower=b))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    assert await runtime.run(p.build(), {"text": "x"}) == "x|x"


async def test_parallel_node_fans_out_and_joins() -> None:
    up = Pipeline("up", input=toy.Text, output=str)
    up.returns(up.function("t", toy.slow_upper, text=up.input.text, seconds=0.3))
    low = Pipeline("low", input=toy.Text, output=str)
    low.returns(low.function("t", toy.whisper, text=low.input.text))
    p = Pipeline("fan", input=toy.Text, output=str)
    p.returns(p.parallel("both", {"upper": up, "lower": low}, join=toy.join_two, text=p.input.text))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    assert await runtime.run(p.build(), {"text": "Ab"}) == "AB|ab"

    no_join = Pipeline("fan2", input=toy.Text, output=dict)
    no_join.returns(no_join.parallel("both", {"upper": up, "lower": low}, text=no_join.input.text))
    assert await runtime.run(no_join.build(), {"text": "Ab"}) == {"upper": "AB", "lower": "ab"}


async def test_bounded_loop_stops_on_condition_and_on_max() -> None:
    p = Pipeline("count", input=toy.Counter, output=toy.Counter)
    p.returns(
        p.loop(
            "loop",
            toy.counter_body(),
            until=toy.reached_three,
            max_iterations=10,
            value=p.input.value,
            history=p.input.history,
        )
    )
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    assert await runtime.run(p.build(), {"value": 0}) == toy.Counter(value=3, history=[0, 1, 2])

    capped = Pipeline("capped", input=toy.Counter, output=toy.Counter)
    capped.returns(
        capped.loop(
            "loop",
            toy.counter_body(),
            until=toy.reached_three,
            max_iterations=2,
            value=capped.input.value,
        )
    )
    assert (await runtime.run(capped.build(), {"value": -5})).value == -3


async def test_node_timeout_names_the_node() -> None:
    p = Pipeline("slow", input=toy.Sleep, output=toy.Echo)
    p.returns(p.call("nap", "flaky", "sleep", seconds=p.input.seconds, timeout_s=0.05))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    with pytest.raises(NodeTimeoutError) as info:
        await runtime.run(p.build(), {"seconds": 1.0})
    assert info.value.node == "nap" and info.value.status_code == 504
    assert "its timeout" in info.value.detail


async def test_request_deadline_travels_to_later_nodes() -> None:
    p = Pipeline("two", input=toy.Text, output=str)
    first = p.function("first", toy.slow_upper, text=p.input.text, seconds=0.15)
    p.returns(p.function("second", toy.slow_upper, text=first, seconds=0.15))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    with pytest.raises(NodeTimeoutError) as info:
        await runtime.run(p.build(), {"text": "x"}, deadline_s=0.2)
    assert info.value.node == "second" and "request deadline" in info.value.detail


async def test_a_graphs_own_deadline_applies_unless_the_caller_sends_one() -> None:
    p = Pipeline("patient", input=toy.Sleep, output=toy.Echo, deadline_s=0.05)
    p.returns(p.call("nap", "flaky", "sleep", seconds=p.input.seconds))
    graph = p.build()
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    with pytest.raises(NodeTimeoutError, match="deadline"):
        await runtime.run(graph, {"seconds": 0.3})
    assert await runtime.run(graph, {"seconds": 0.3}, deadline_s=5) == toy.Echo(text="slept")


async def test_idempotent_node_retries_then_succeeds() -> None:
    flaky = toy.Flaky(failures=2)
    p = Pipeline("retry", input=toy.Text, output=toy.Echo)
    p.returns(p.call("echo", "flaky", "echo", text=p.input.text, idempotent=True, retries=2))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(flaky=flaky))
    result = await runtime.execute(p.build(), {"text": "hi"})
    assert result.output == toy.Echo(text="hi") and flaky.attempts == 3
    assert [r.status for r in result.nodes] == ["error", "error", "ok"]


async def test_failure_without_fallback_names_node_and_with_fallback_recovers() -> None:
    p = Pipeline("fail", input=toy.Text, output=toy.Echo)
    p.returns(p.call("echo", "flaky", "echo", text=p.input.text))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(flaky=toy.Flaky(failures=5)))
    with pytest.raises(NodeFailedError) as info:
        await runtime.run(p.build(), {"text": "hi"})
    assert info.value.node == "echo" and "ConnectionError" in info.value.detail

    q = Pipeline("fallback", input=toy.Text, output=toy.Echo)
    q.returns(q.call("echo", "flaky", "echo", text=q.input.text, fallback=toy.fallback_text))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(flaky=toy.Flaky(failures=5)))
    result = await runtime.execute(q.build(), {"text": "hi"})
    assert result.output == toy.Echo(text="fallback:hi")
    assert [r.status for r in result.nodes] == ["error", "fallback"]


async def test_bad_input_is_an_input_error_naming_node_and_field() -> None:
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    with pytest.raises(NodeInputError) as info:
        await runtime.run(toy.rag().build(), {"question": "   "})
    assert info.value.node == "embed" and "'text'" in info.value.detail
    with pytest.raises(NodeInputError) as info:
        await runtime.run(toy.rag().build(), {"k": 2})
    assert info.value.node == "input" and "question" in info.value.detail


async def test_bad_input_is_not_retried_even_on_an_idempotent_node() -> None:
    embedder = toy.ToyEmbedder()
    p = Pipeline("once", input=toy.Text, output=toy.Vector)
    p.returns(p.call("embed", "embedder", "embed", text=p.input.text, idempotent=True, retries=3))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(embedder=embedder))
    with pytest.raises(NodeInputError):
        await runtime.run(p.build(), {"text": "   "})
    assert embedder.calls == 1


async def test_a_failure_cancels_waiting_branches_cleanly() -> None:
    """A fast failure fails the request with its node's name and cancels the branches
    still waiting on a slow node, leaving no stray task errors behind."""
    import asyncio

    problems: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
    p = Pipeline("cancel", input=toy.Text, output=str)
    slow = p.function("slow", toy.slow_upper, text=p.input.text, seconds=0.2)
    waits = p.function("waits", toy.join_two, upper=slow, lower=slow)
    fails = p.call("fails", "flaky", "echo", text=p.input.text)
    p.returns(p.function("join", toy.join_two, upper=waits, lower=fails.text))
    runtime = InProcessRuntime(toy.CATALOG, toy.servers(flaky=toy.Flaky(failures=5)))
    with pytest.raises(NodeFailedError) as info:
        await runtime.run(p.build(), {"text": "x"})
    assert info.value.node == "fails"
    # Wait (bounded) until every other task has ended, then check none left an error.
    this = asyncio.current_task()
    for _ in range(1_000):
        if not [t for t in asyncio.all_tasks() if t is not this]:
            break
        await asyncio.sleep(0.01)
    assert not [t for t in asyncio.all_tasks() if t is not this]
    assert not problems, problems


class _Write(BaseModel):
    text: str
    key: str = ""


class _KeyedWrites:
    """A write that fails the first attempt of node `first`; records every key."""

    def __init__(self, fail: bool = True) -> None:
        self.keys: list[str] = []
        self.fail = fail

    async def put(self, request: _Write) -> toy.Echo:
        self.keys.append(request.key)
        if self.fail and request.key.endswith("/first"):
            self.fail = False
            raise ConnectionError("replica died mid-call")
        return toy.Echo(text=request.text)


async def test_a_writes_idempotency_key_is_the_run_and_the_node_on_every_attempt() -> None:
    contract = MethodContract(
        _Write, toy.Echo, writes=True, idempotent=True, idempotency_field="key"
    )
    catalog = Catalog([ServerSpec("store", {"put": contract}, "x:y", "S", "/s")])
    p = Pipeline("writes", input=toy.Text, output=str)
    first = p.call("first", "store", "put", text=p.input.text, idempotent=True, retries=1)
    second = p.call("second", "store", "put", text=first.text)
    mine = p.call("mine", "store", "put", text=p.input.text, key="callers-own")
    p.returns(p.function("join", toy.join_two, upper=second.text, lower=mine.text))
    store = _KeyedWrites()
    result = await InProcessRuntime(catalog, {"store": store}).execute(
        p.build(), {"text": "hi"}, run_id="run-1"
    )
    assert result.run_id == "run-1"
    # Both attempts of `first` carry one key; each node its own; a key the pipeline
    # set is kept.
    assert sorted(store.keys) == sorted(
        ["run-1/first", "run-1/first", "run-1/second", "callers-own"]
    )
    other = _KeyedWrites(fail=False)
    again = await InProcessRuntime(catalog, {"store": other}).execute(p.build(), {"text": "hi"})
    assert len(again.run_id) == 32 and f"{again.run_id}/first" in other.keys


def test_an_idempotency_field_is_for_a_write_made_safe_to_repeat() -> None:
    with pytest.raises(CatalogError, match="not a field of _Write"):
        MethodContract(_Write, toy.Echo, writes=True, idempotent=True, idempotency_field="k")
    with pytest.raises(CatalogError, match="`writes=True`"):
        MethodContract(_Write, toy.Echo, idempotent=True, idempotency_field="key")
