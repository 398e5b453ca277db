"""Runs that wait for approval, below HTTP (`servegraph.serving.runs.Runs`), in process on
the real support records and a real SQLite run store: a decision whose action fails for
a passing reason is not used up, expired approvals are resolved before they are listed,
and a run is read only by the key that started it or one that may decide. No Ray."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import closing

import pytest
from fastapi.responses import JSONResponse

from deployments.records.contract import ActionResult, RefundRequest
from deployments.records.model import SupportRecords
from pipelines.agent.refund import build_pipeline
from servegraph import InProcessRuntime, OverloadedError
from servegraph.errors import ServerUnavailableError
from servegraph.security.keys import Caller
from servegraph.serving.runs import DecisionBody, Keeper, Runs, RunStore
from tests.servegraph.test_approval import CATALOG

TICKET = {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}
APPROVER = Caller("lead", frozenset({"approve:refund"}))
STARTER = Caller("support-app", frozenset({"invoke:refund"}))


class Busy(SupportRecords):
    """The real records, full for the first `busy` refunds."""

    busy = 1

    async def refund_order(self, request: RefundRequest) -> ActionResult:
        if self.busy:
            self.busy -= 1
            raise ServerUnavailableError("records", "queue full")
        return await super().refund_order(request)


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Runs:
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))  # the real seed, built here
    runtime = InProcessRuntime(CATALOG, {"records": Busy()})
    compiled = runtime.compile(build_pipeline().build())
    return Runs(compiled, runtime, RunStore(tmp_path / "runs.sqlite3"))


async def waiting(runs: Runs) -> str:
    request = runs.compiled.input.model_validate(TICKET)
    run_id, started = await runs.start(request, STARTER)
    assert isinstance(started, JSONResponse) and started.status_code == 202
    assert json.loads(started.body)["run_id"] == run_id
    return run_id


async def test_a_decision_whose_action_fails_for_a_passing_reason_is_not_used_up(runs) -> None:
    run_id = await waiting(runs)
    with pytest.raises(OverloadedError):
        await runs.decide(run_id, DecisionBody(decision="approve"), APPROVER)
    run = runs.store.get(run_id)
    assert run["status"] == "waiting" and run["decisions"] == [] and run["expires"]
    done = await runs.decide(run_id, DecisionBody(decision="approve"), APPROVER)
    answer = json.loads(done.body)
    assert answer["status"] == "finished" and answer["output"]["outcome"] == "refunded"
    assert [d["by"] for d in runs.store.get(run_id)["decisions"]] == ["lead"]


async def test_expired_approvals_are_resolved_and_runs_read_by_their_starter_or_deciders(
    runs,
) -> None:
    run_id = await waiting(runs)
    runs.store._update(run_id, expires=1.0)  # long past
    assert await runs.listed("waiting", 10, 0) == []  # resolved before it is listed
    run = runs.store.get(run_id)
    assert run["status"] == "expired" and run["output"]["outcome"] == "handed_off"
    refused = await runs.decide(run_id, DecisionBody(decision="approve"), APPROVER)
    assert refused.status_code == 409 and json.loads(refused.body)["status"] == "expired"

    assert (await runs.view(run_id, STARTER)).status == "expired"
    other = Caller("another-app", frozenset({"invoke:refund"}))
    assert (await runs.view(run_id, other)).status_code == 404


class Slow(SupportRecords):
    """The real records; `lookup_order` counts its calls and, while `hold` is set,
    waits there until the caller goes away (a replica dying, a caller hanging up)."""

    looked = 0
    hold = True

    async def lookup_order(self, request):  # type: ignore[no-untyped-def]
        Slow.looked += 1
        while Slow.hold:
            await asyncio.sleep(0.01)
        return await super().lookup_order(request)


async def inside_look() -> None:
    """Until a run is inside `look` (bounded)."""

    async def looked() -> None:
        while Slow.looked == 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(looked(), 30)


def replica(path, records: SupportRecords) -> Runs:
    """An ingress replica's `Runs` of `refund` over the shared run store at `path`."""
    runtime = InProcessRuntime(CATALOG, {"records": records})
    return Runs(runtime.compile(build_pipeline().build()), runtime, RunStore(path))


def lapse(store: RunStore, run_id: str) -> None:
    """The run's lease runs out (its owner stopped renewing it: died, or let it go)."""
    with closing(store._connect()) as db, db:
        db.execute("UPDATE runs SET lease = ? WHERE run_id = ?", (time.time() - 1, run_id))


async def test_a_run_its_replica_stopped_executing_is_adopted_once_and_resumed_past_its_checkpoints(
    tmp_path, monkeypatch
) -> None:
    """Replica A's caller hangs up during `look` (the run is cancelled with the request,
    left `running`). While A renews nothing for it, neither of two replicas sweeping at
    once adopts a run whose lease holds; once it lapses, exactly one does and runs it
    to the approval; a node finished before (checkpointed) is not run again."""
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    Slow.looked, Slow.hold = 0, True
    path = tmp_path / "runs.sqlite3"
    a, b, c = (replica(path, Slow()) for _ in range(3))
    request = a.compiled.input.model_validate(TICKET)
    started = asyncio.create_task(a.start(request, STARTER))
    await inside_look()
    (run_id,) = a.store.active
    started.cancel()  # the caller hung up
    with pytest.raises(asyncio.CancelledError):
        await started
    assert a.store.active == {} and a.store.get(run_id)["status"] == "running"

    keepers = [Keeper(b.store, [b]), Keeper(c.store, [c])]
    assert await asyncio.gather(*(k.tick() for k in keepers)) == [[], []]  # the lease holds
    lapse(a.store, run_id)
    Slow.hold = False
    adopted = await asyncio.gather(*(k.tick() for k in keepers))
    assert sorted(adopted, key=len) == [[], [run_id]]
    await asyncio.gather(*(t for k in keepers for t in list(k.resuming)))
    run = a.store.get(run_id)
    assert run["status"] == "waiting" and run["awaiting"]["node"] == "approve"
    assert Slow.looked == 2 and run["adopted"] == 1  # A's attempt, cancelled; the adopter's
    # The adopter's decision is taken by any replica; the first replica, whose run was
    # adopted, writes nothing more to it.
    a.store.ended(run_id, "failed", error={"detail": "late write of a replica that let go"})
    assert a.store.get(run_id)["status"] == "waiting"
    done = await c.decide(run_id, DecisionBody(decision="approve"), APPROVER)
    assert json.loads(done.body)["output"]["outcome"] == "refunded"
    assert Slow.looked == 2  # `look` was checkpointed: the resume did not call it again


async def test_a_replica_that_keeps_executing_a_run_keeps_it(tmp_path, monkeypatch) -> None:
    """A's lease is renewed each round, so another replica never adopts a run A is
    still executing, even when the lease's first term has run out."""
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    Slow.looked, Slow.hold = 0, True
    path = tmp_path / "runs.sqlite3"
    a, b = replica(path, Slow()), replica(path, Slow())
    request = a.compiled.input.model_validate(TICKET)
    started = asyncio.create_task(a.start(request, STARTER))
    await inside_look()
    (run_id,) = a.store.active
    lapse(a.store, run_id)
    assert await Keeper(a.store, [a]).tick() == []  # A renews, and adopts nothing of its own
    assert await Keeper(b.store, [b]).tick() == []
    Slow.hold = False
    run_id_again, outcome = await started
    assert run_id_again == run_id and isinstance(outcome, JSONResponse)
    assert a.store.get(run_id)["status"] == "waiting" and Slow.looked == 1


async def test_a_run_whose_request_ended_without_letting_it_go_is_adopted(
    tmp_path, monkeypatch
) -> None:
    """A lease is renewed only while the task that holds the run runs: a request that
    recorded its run and ended any other way (its response never sent) lets it go."""
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    path = tmp_path / "runs.sqlite3"
    a, b = replica(path, SupportRecords()), replica(path, SupportRecords())
    request = a.compiled.input.model_validate(TICKET)
    recorded = await asyncio.create_task(a.begin(request, STARTER))  # its task has ended
    run_id = recorded["run_id"]
    assert a.store.renew() == 0 and a.store.active == {}
    lapse(a.store, run_id)
    keeper = Keeper(b.store, [b])
    assert await keeper.tick() == [run_id]
    await asyncio.gather(*keeper.resuming)
    assert b.store.get(run_id)["status"] == "waiting"
