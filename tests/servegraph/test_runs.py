"""Runs that wait for approval, below HTTP (`servegraph.serving.runs.Runs`), in process on
the real support records and a real SQLite run store: a decision whose action fails for
a passing reason is not used up, expired approvals are resolved before they are listed,
and a run is read only by the key that started it or one that may decide. No Ray."""

from __future__ import annotations

import json

import pytest
from fastapi.responses import JSONResponse

from deployments.records.contract import ActionResult, RefundRequest
from deployments.records.model import SupportRecords
from pipelines.agent.refund import build_pipeline
from servegraph import InProcessRuntime, OverloadedError
from servegraph.errors import ServerUnavailableError
from servegraph.security.keys import Caller
from servegraph.serving.runs import DecisionBody, Runs, RunStore
from tests.servegraph.test_approval import CATALOG

TICKET = {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}
APPROVER = Caller("lead", frozenset({"approve:refund"}))
STARTER = Caller("support-app", frozenset({"write:refund"}))


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
    other = Caller("another-app", frozenset({"write:refund"}))
    assert (await runs.view(run_id, other)).status_code == 404
