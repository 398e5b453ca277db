"""Graph-aware scaling's arithmetic and its pieces, without Ray: calls per request from
graphs (fan-out, switches, loops, servers shared by pipelines), blending with what
requests did, arrival rates, replicas wanted, the policy Serve calls, and options
refused at build time naming the field."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from servegraph.deploy.scaling import watch
from servegraph.deploy.scaling.board import DemandBoard, Reporter
from servegraph.deploy.scaling.demand import (
    Arrivals,
    CallMix,
    Load,
    call_paths,
    prior_calls,
    replicas_wanted,
    server_loads,
    servers_called,
)
from servegraph.deploy.scaling.policy import GraphAwarePolicy
from servegraph.deploy.scaling.settings import (
    POLICY_PATH,
    check_graph_autoscaling,
    graph_autoscaling,
)
from servegraph.lang.graph import CallNode, Graph, LoopNode, ParallelNode, SwitchNode


def _call(name: str, server: str) -> CallNode:
    return CallNode(name=name, server=server, method="m")


def _graph(name: str, *nodes: Any) -> Graph:
    return Graph(name=name, input="x:In", output="x:Out", nodes=list(nodes), returns="input")


def agent() -> Graph:
    """classify, then a loop of at most 4 rounds: the LLM chooses, then one of three
    tools (a search calls the embedder and the index in parallel; a lookup the
    records); then the LLM drafts."""
    search = _graph(
        "search",
        ParallelNode(
            name="both",
            branches={
                "e": _graph("e", _call("embed", "embedder")),
                "v": _graph("v", _call("find", "index")),
            },
        ),
    )
    tools = SwitchNode(
        name="act",
        on="choose",
        cases={"search": search, "lookup": _graph("l", _call("find", "records"))},
        default=_graph("none"),
    )
    body = _graph("round", _call("choose", "llm"), tools)
    loop = LoopNode(name="work", body=body, until="x:done", max_iterations=4)
    return _graph("agent", _call("classify", "classifier"), loop, _call("draft", "llm"))


def test_calls_per_request_from_the_graph() -> None:
    calls = prior_calls(agent())
    # a loop counts half its rounds (2); a switch's three cases equally likely
    assert calls["classifier"] == 1
    assert calls["llm"] == 2 + 1
    assert calls["embedder"] == pytest.approx(2 / 3)  # 2 rounds x 1/3 x 1
    assert calls["index"] == pytest.approx(2 / 3)
    assert calls["records"] == pytest.approx(2 / 3)


def test_records_name_their_server_whatever_the_round() -> None:
    paths = call_paths(agent())
    assert paths["work/iter/act/search/both/branch[e]/embed"] == "embedder"
    records = [
        ("classify", "call", "ok"),
        ("work/iter[0]/choose", "call", "ok"),
        ("work/iter[0]/act/search/both/branch[e]/embed", "call", "error"),
        ("work/iter[0]/act/search/both/branch[e]/embed", "call", "ok"),  # its retry: load too
        ("work/iter[1]/choose", "call", "ok"),
        ("draft", "call", "budget"),  # stopped before it ran: no call
        ("work/iter[1]/pick", "function", "ok"),
    ]
    assert servers_called(paths, records) == {"classifier": 1, "llm": 2, "embedder": 2}


def test_observed_calls_outweigh_the_prior_as_requests_come() -> None:
    mix = CallMix({"llm": 3.0, "records": 2 / 3})
    assert mix.per_request() == {"llm": 3.0, "records": pytest.approx(2 / 3)}
    for _ in range(200):  # the loop always stops after one round, and looks nothing up
        mix.observe(1, {"llm": 2})
    seen = mix.per_request()
    assert 2.0 < seen["llm"] < 2.1
    assert seen["records"] < 0.07
    mix.observe(0, {"llm": 100})  # no request: nothing to learn
    assert mix.per_request() == seen


def test_rates_follow_a_step_within_a_bucket_and_hold_over_the_long_window() -> None:
    arrivals = Arrivals(bucket_s=0.25, keep_s=120)
    for tick in range(40):  # 10 s at 4 requests/s
        arrivals.add(1, tick * 0.25)
    assert arrivals.rate(2, 10) == pytest.approx(4, rel=0.15)
    arrivals.add(10, 10.1)  # the step: 10 more in this bucket
    assert arrivals.rate(2, 10.1) > 8
    assert arrivals.rate(0.25, 10.1) >= 40
    later = 10.1 + 20  # nothing for 20 s
    assert arrivals.rate(2, later) == 0
    assert arrivals.rate(30, later) > 0
    arrivals.add(1, 200)  # old buckets go
    assert min(arrivals.buckets) >= math.floor((200 - 120) / 0.25)


def test_a_short_window_is_believed_only_with_enough_arrivals() -> None:
    arrivals = Arrivals()
    for t in range(0, 120, 4):  # a slow pipeline: one request every 4 s
        arrivals.add(1, float(t))
    arrivals.add(1, 120.5)  # two a second apart: chance, not a step
    chance = arrivals.load(2, 30, 121.0)
    assert chance.short == chance.long == pytest.approx(8 / 30, rel=0.1)
    arrivals.add(3, 121.2)  # the fourth in the window: a step
    step = arrivals.load(2, 30, 121.3)
    assert step.short == pytest.approx(4 / 2) and step.short > step.long


def test_a_server_shared_by_pipelines_sums_their_loads() -> None:
    rates = {"rag": Load(10, 4), "agent": Load(2, 2)}
    mixes = {"rag": {"embedder": 2, "llm": 1}, "agent": {"embedder": 0.5, "llm": 3}}
    loads = server_loads(rates, mixes)
    assert loads["embedder"] == Load(21, 9)
    assert loads["llm"] == Load(16, 10)


def test_replicas_wanted_from_load_and_from_the_queue() -> None:
    # 100 calls/s at 20 ms each fills 2 replicas; at 80 % busy, 2.5
    assert replicas_wanted(Load(100, 10), service_time_s=0.02, target_utilisation=0.8) == 2.5
    # after a spike the long window holds capacity
    assert replicas_wanted(Load(0, 50), service_time_s=0.02, target_utilisation=1) == 1.0
    # a queue the prediction missed (calls from outside the pipelines) still counts
    wanted = replicas_wanted(
        Load(0, 0), service_time_s=0.02, target_utilisation=1, ongoing=96, target_ongoing=32
    )
    assert wanted == 3.0


def test_the_board_turns_arrivals_into_every_servers_load_at_once() -> None:
    now = [100.0]
    board = DemandBoard(clock=lambda: now[0])
    prior = {"rag": {"embedder": 2.0, "index": 1.0, "llm": 1.0}}
    for _ in range(8):  # 2 s at 20 requests/s, from two ingress replicas
        board.report({"rag": 3}, {}, prior)
        board.report({"rag": 2}, {}, prior)
        now[0] += 0.25
    loads = board.loads(2, 30)
    assert loads["embedder"][0] == pytest.approx(40, rel=0.15)
    assert loads["llm"][0] == pytest.approx(20, rel=0.15)
    assert loads["index"][0] == loads["llm"][0]
    board.report({}, {"rag": (100, {"embedder": 100, "index": 100, "llm": 100})})
    assert board.mixes()["rag"]["embedder"] < 1.3  # re-ranking turned out rare


def test_a_restarted_board_has_the_priors_with_the_next_report() -> None:
    board = DemandBoard(clock=lambda: 10.0)
    board.report({"rag": 4}, {})  # no prior yet: nothing to multiply by
    assert board.loads(2, 30) == {}
    board.report({"rag": 4}, {}, {"rag": {"llm": 1.0}})
    assert board.loads(2, 30)["llm"][0] > 0
    board.report({}, {}, {"rag": {"llm": 2.0}})  # the graph was redeployed, changed
    assert board.mixes()["rag"]["llm"] == 2.0


def test_the_board_answers_a_long_poll_when_a_report_comes() -> None:
    """`loads_after`: a caller that has seen the board's version waits for the next
    report (or `wait_s`); any other version, a restarted board's, is answered at once."""
    board = DemandBoard(clock=lambda: 10.0)
    prior = {"rag": {"llm": 1.0}}
    windows = [(2.0, 30.0)]

    async def main() -> None:
        version, loads = await board.loads_after(-1, 60, windows)  # first call: at once
        assert version == 0 and loads == {(2.0, 30.0): {}}
        waiting = asyncio.create_task(board.loads_after(version, 60, windows))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # nothing new: it waits
        board.report({"rag": 4}, {}, prior)
        version, loads = await asyncio.wait_for(waiting, 5)
        assert version == 1 and loads[(2.0, 30.0)]["llm"][0] > 0
        # nothing arrives within wait_s: the same version, answered after it
        assert (await board.loads_after(version, 0.0, windows))[0] == 1
        assert (await board.loads_after(57, 60, windows))[0] == 1  # a restarted board

    asyncio.run(main())


def test_a_stale_snapshot_predicts_nothing() -> None:
    now = [0.0]
    watcher = watch._Watcher(clock=lambda: now[0])
    watcher._thread = _Alive()  # no polling thread in a unit test
    watcher.publish({(2.0, 30.0): {"llm": (5.0, 1.0)}})
    assert watcher.load("llm", 2.0, 30.0) == Load(5.0, 1.0)
    now[0] += watch.STALE_S + 0.1  # the board stopped answering
    assert watcher.load("llm", 2.0, 30.0) == Load()


def test_one_ticks_policies_read_one_snapshot() -> None:
    now = [0.0]
    watcher = watch._Watcher(clock=lambda: now[0])
    watcher._thread = _Alive()
    watcher.publish({(2.0, 30.0): {"llm": (1.0, 1.0), "embedder": (1.0, 1.0)}})
    now[0] += 0.1  # a tick: the embedder's policy reads first
    assert watcher.load("embedder", 2.0, 30.0) == Load(1.0, 1.0)
    watcher.publish({(2.0, 30.0): {"llm": (9.0, 1.0), "embedder": (9.0, 1.0)}})
    now[0] += 0.001  # the LLM's policy, the same tick: the same snapshot
    assert watcher.load("llm", 2.0, 30.0) == Load(1.0, 1.0)
    now[0] += 0.1  # the next tick sees the step, for both
    assert watcher.load("llm", 2.0, 30.0) == watcher.load("embedder", 2.0, 30.0) == Load(9.0, 1.0)


class _Alive:
    def is_alive(self) -> bool:
        return True


def test_the_reporter_counts_and_hands_over_its_counts() -> None:
    graph = agent()
    reporter = Reporter({"agent": graph}, board=object())
    reporter.arrived("agent")  # outside a loop: counted, no task
    reporter.arrived("agent")

    @dataclass
    class Record:
        node: str
        kind: str
        status: str

    reporter.finished("agent", [Record("classify", "call", "ok"), Record("draft", "call", "ok")])
    reporter.finished("unknown", [Record("classify", "call", "ok")])
    arrived, finished = reporter.take()
    assert arrived == {"agent": 2}
    assert finished == {"agent": (1, {"classifier": 1, "llm": 1})}
    assert reporter.take() == ({}, {})


def test_the_reporter_sends_from_a_task_and_stops_when_idle() -> None:
    sent: list[tuple[str, Any]] = []

    class Board:
        class _Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args: Any) -> None:
                sent.append((self.name, args))

        report = _Method("report")

    async def main() -> None:
        reporter = Reporter({"agent": agent()}, board=Board())
        reporter.arrived("agent")
        task = reporter._task
        assert task is not None
        await asyncio.wait_for(task, 5)  # reports once, then finds nothing and ends

    asyncio.run(main())
    assert [name for name, _ in sent] == ["report"]
    arrived, finished, priors = sent[0][1]
    assert (arrived, finished) == ({"agent": 1}, {})
    assert priors == {"agent": prior_calls(agent())}


def _ctx(
    ongoing: float = 0.0, *, replicas: int = 1, at: float = 0.0, state: dict | None = None
) -> Any:
    return SimpleNamespace(
        total_num_requests=ongoing,
        current_num_replicas=replicas,
        current_time=at,
        policy_state=state or {},
        config=SimpleNamespace(target_ongoing_requests=32),
    )


class _Loads:
    def __init__(self, loads: dict[str, Load]) -> None:
        self.loads = loads

    def load(self, server: str, short_s: float, long_s: float) -> Load:
        assert (short_s, long_s) == (2.0, 30.0)
        return self.loads.get(server, Load())


def test_the_policy_obeys_the_prediction_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "_WATCHER", _Loads({"embedder": Load(300, 100)}))
    embedder = GraphAwarePolicy(server="embedder", service_time_s=0.01, target_utilisation=0.5)
    wanted, state = embedder(_ctx())
    assert wanted == 6.0 and state["calls_per_s_short"] == 300


def test_the_policy_obeys_a_queue_only_when_it_lasts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "_WATCHER", _Loads({}))  # calls no pipeline predicts
    llm = GraphAwarePolicy(server="llm", service_time_s=1.0, reactive_delay_s=30)
    wanted, state = llm(_ctx(ongoing=96, at=100.0))
    assert wanted == 1.0 and state["queue_above_since"] == 100.0  # held, not grown
    wanted, state = llm(_ctx(ongoing=96, at=129.0, state=state))
    assert wanted == 1.0
    wanted, state = llm(_ctx(ongoing=96, at=130.0, state=state))
    assert wanted == 3.0  # 96 ongoing at 32 each, asked for 30 s
    # the queue passes: nothing grows; what runs is held while the queue still uses it
    wanted, state = llm(_ctx(ongoing=40, replicas=3, at=131.0, state=state))
    assert state["queue_above_since"] is None and wanted == 1.25
    wanted, _ = llm(_ctx(ongoing=0, replicas=3, at=132.0, state=state))
    assert wanted == 0.0  # Serve's downscale delay and bounds pace the fall


def test_spare_replicas_are_kept_beyond_the_prediction_while_pipelines_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A warm reserve for a step: `spare_replicas` on top of what the arrivals need,
    only while the server's pipelines send anything (an idle server keeps its minimum,
    zero where it scales to zero)."""
    monkeypatch.setattr(watch, "_WATCHER", _Loads({"llm": Load(1.0, 0.5)}))
    llm = GraphAwarePolicy(server="llm", service_time_s=0.7, spare_replicas=1)
    wanted, state = llm(_ctx())
    assert wanted == pytest.approx(2.0) and state["spare"] == 1
    assert state["predicted"] == pytest.approx(1.0)  # the arrivals' need, without it
    assert GraphAwarePolicy(server="llm", service_time_s=0.7)(_ctx())[0] == pytest.approx(1.0)
    # a queue that lasts gets the reserve on top too: 96 ongoing at 32 each, for 30 s
    wanted, state = llm(_ctx(ongoing=96, replicas=2, at=100.0))
    assert wanted == pytest.approx(2.0)  # passing, so far
    wanted, _ = llm(_ctx(ongoing=96, replicas=2, at=130.0, state=state))
    assert wanted == pytest.approx(3.0 + 1)
    monkeypatch.setattr(watch, "_WATCHER", _Loads({}))  # no arrivals in the long window
    wanted, state = llm(_ctx())
    assert wanted == 0.0 and state["spare"] == 0


def test_a_reserve_that_leaves_no_replica_for_the_load_is_refused() -> None:
    """`spare_replicas` under `max_replicas`, whether the config comes from
    `graph_autoscaling` or was written by hand (a profile, a YAML override)."""
    with pytest.raises(ValueError, match="spare_replicas"):
        graph_autoscaling(
            "llm",
            service_time_s=0.7,
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=8,
            spare_replicas=2,
        )
    by_hand = {
        "min_replicas": 1,
        "max_replicas": 4,
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {"server": "llm", "service_time_s": 0.7, "spare_replicas": 4},
        },
    }
    with pytest.raises(ValueError, match="spare_replicas"):
        check_graph_autoscaling(by_hand)
    by_hand["policy"]["policy_kwargs"]["target_utilisation"] = 2  # type: ignore[index]
    with pytest.raises(ValidationError, match="target_utilisation"):
        check_graph_autoscaling(by_hand)
    check_graph_autoscaling({"min_replicas": 1, "max_replicas": 2})  # Serve's own policy
    check_graph_autoscaling(None)  # a fixed replica count


def test_graph_autoscaling_is_a_serve_config_with_the_policy() -> None:
    config = graph_autoscaling(
        "embedder",
        service_time_s=0.003,
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=32,
        target_utilisation=0.6,
        downscale_delay_s=60,
    )
    assert config["policy"]["policy_function"] == POLICY_PATH
    assert config["policy"]["policy_kwargs"]["target_utilisation"] == 0.6
    assert config["upscale_delay_s"] == 0 and config["downscale_delay_s"] == 60
    from ray.serve.config import AutoscalingConfig  # Serve takes it as it is

    assert AutoscalingConfig(**config).max_replicas == 4


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"short_window_s": -1}, "short_window_s"),
        ({"short_window_s": 10, "long_window_s": 5}, "long_window_s"),
        ({"target_utilisation": 0}, "target_utilisation"),
        ({"target_utilisation": 1.5}, "target_utilisation"),
        ({"min_replicas": 4, "max_replicas": 2}, "max_replicas"),
        ({"service_time_s": 0}, "service_time_s"),
        ({"downscaling_factor": 2}, "downscaling_factor"),
        ({"spare_replicas": -1}, "spare_replicas"),
    ],
)
def test_an_option_out_of_range_is_refused_naming_it(options: dict[str, Any], field: str) -> None:
    given: dict[str, Any] = {
        "service_time_s": 0.003,
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
    } | options
    with pytest.raises(ValidationError) as refused:
        graph_autoscaling("embedder", **given)
    assert field in str(refused.value)


def test_the_board_refreshes_the_snapshot_well_before_it_goes_stale() -> None:
    """At rest the watcher's snapshot is refreshed every long poll; a controller slower
    than that by the poll again still reads a snapshot it believes."""
    from servegraph.deploy.scaling.board import LONG_POLL_S

    assert LONG_POLL_S + watch.MIN_GAP_S <= watch.STALE_S / 2
