"""The approval node, in process on the real support records (SQLite): a run stops for
a person, resumes from its checkpoints with their decision (approve, approve with
edited arguments, reject, expire), and the approved action is applied once however
often the decision is carried out. No Ray."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from deployments.records import SERVER, records
from deployments.records.contract import ActionResult, Lookup, LookupRequest
from deployments.records.model import SupportRecords
from servegraph import (
    Catalog,
    Decision,
    GraphValidationError,
    InProcessRuntime,
    MemoryCheckpoints,
    NodeInputError,
    Pipeline,
    RunWaiting,
    Verdict,
    from_yaml,
    to_text,
    to_yaml,
    validate,
)

CATALOG = Catalog([SERVER])
TICKET = {"text": "Please refund order 12345, it arrived broken", "email": "ana@example.com"}


class Ticket(BaseModel):
    text: str
    email: str


def summarize(found: str) -> str:
    return f"Refund asked for: {found}"


def reply(decision: Decision) -> str:
    if decision.decision != "approved" or decision.result is None:
        return f"not refunded ({decision.decision}: {decision.reason})"
    return ActionResult.model_validate(decision.result).message


def refunds() -> Pipeline:
    p = Pipeline("refunds", input=Ticket, output=str)
    found = p.call("look", records.lookup_order(text=p.input.text, email=p.input.email))
    summary = p.function("summary", summarize, found=found.message)
    decision = p.approval(
        "approve",
        records.refund_order(text=p.input.text, email=p.input.email, reason="arrived broken"),
        summary=summary,
        expires_s=3600,
        editable=["amount"],
    )
    p.returns(p.function("reply", reply, decision=decision))
    return p


class Counted(SupportRecords):
    """The real records, counting look-ups (a resumed run must not repeat them)."""

    lookups = 0

    async def lookup_order(self, request: LookupRequest) -> Lookup:
        self.lookups += 1
        return await super().lookup_order(request)


@pytest.fixture
def shop(tmp_path, monkeypatch) -> Counted:
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))  # the real seed, built here
    return Counted()


def refunded(shop: SupportRecords) -> list[tuple[str, str]]:
    with sqlite3.connect(shop.path) as db:
        return db.execute("SELECT order_id, amount FROM refunds").fetchall()


async def stopped(runtime: InProcessRuntime, checkpoints: MemoryCheckpoints) -> RunWaiting:
    with pytest.raises(RunWaiting) as waiting:
        await runtime.execute(refunds().build(), TICKET, run_id="r1", checkpoints=checkpoints)
    return waiting.value


async def test_a_run_stops_at_the_approval_with_what_it_proposes(shop) -> None:
    runtime = InProcessRuntime(CATALOG, {"records": shop})
    waiting = await stopped(runtime, MemoryCheckpoints())
    pending = waiting.pending
    assert waiting.run_id == "r1" and pending.node == "approve"
    assert (pending.server, pending.method, pending.expires_s) == ("records", "refund_order", 3600)
    assert pending.arguments == TICKET | {"reason": "arrived broken", "amount": None}
    assert pending.summary.startswith("Refund asked for: order 12345: Nimbus headphones")
    assert refunded(shop) == []  # nothing applied before the decision


async def test_approved_the_run_resumes_past_finished_nodes_and_acts_once(shop) -> None:
    runtime = InProcessRuntime(CATALOG, {"records": shop})
    checkpoints = MemoryCheckpoints()
    await stopped(runtime, checkpoints)
    before = dict(checkpoints.values)
    decided = {"approve": Verdict("approve", by="support-lead")}
    result = await runtime.execute(
        refunds().build(), TICKET, run_id="r1", checkpoints=checkpoints, decisions=decided
    )
    assert result.output == "order 12345 refunded $89.90"
    assert shop.lookups == 1  # the look-up ran before the stop only
    assert refunded(shop) == [("12345", "89.90")]
    decision = checkpoints.values[("r1", "approve")]
    assert (decision.decision, decision.by) == ("approved", "support-lead")
    # The decision carried out again, from the checkpoints of before it (a crash
    # between the action and its checkpoint): the action answers its first outcome.
    again = await runtime.execute(
        refunds().build(), TICKET, run_id="r1", checkpoints=_copy(before), decisions=decided
    )
    assert again.output == "order 12345 refunded $89.90"
    assert refunded(shop) == [("12345", "89.90")]


async def test_approved_with_edited_arguments_or_rejected_or_expired(shop) -> None:
    runtime = InProcessRuntime(CATALOG, {"records": shop})
    build = refunds().build()

    async def decide(run_id: str, verdict: Verdict) -> str:
        checkpoints = MemoryCheckpoints()
        with pytest.raises(RunWaiting):
            await runtime.execute(build, TICKET, run_id=run_id, checkpoints=checkpoints)
        done = await runtime.execute(
            build, TICKET, run_id=run_id, checkpoints=checkpoints, decisions={"approve": verdict}
        )
        return str(done.output)

    rejected = Verdict("reject", by="lead", reason="customer keeps the item")
    assert await decide("no", rejected) == "not refunded (rejected: customer keeps the item)"
    assert await decide("late", Verdict("expire")) == "not refunded (expired: )"
    assert refunded(shop) == []
    with pytest.raises(NodeInputError) as bad:
        await decide("bad", Verdict("approve", arguments={"amount": "-5"}))
    assert "amount" in str(bad.value)
    # Only what the approval lets the person change: never the customer, nor the key.
    for field in ("email", "idempotency_key"):
        with pytest.raises(NodeInputError) as widened:
            await decide(f"wide-{field}", Verdict("approve", arguments={field: "x"}))
        assert widened.value.problems[0]["field"] == field
    edited = Verdict("approve", arguments={"amount": str(Decimal("10.00"))})
    assert await decide("part", edited) == "order 12345 refunded $10.00"
    assert refunded(shop) == [("12345", "10.00")]


def test_an_approval_is_validated_like_every_node() -> None:
    p = Pipeline("reads", input=Ticket, output=str)
    found = p.call("look", records.lookup_order(text=p.input.text, email=p.input.email))
    decision = p.approval(
        "approve",
        records.lookup_order(text=p.input.text, email=p.input.email),
        summary=found,  # a Lookup, not text
        editable=["nope"],
    )
    p.returns(p.function("reply", reply, decision=decision))
    with pytest.raises(GraphValidationError) as invalid:
        validate(p.build(), CATALOG)
    text = str(invalid.value)
    assert "records.lookup_order is not a write applied once per key" in text
    assert "the summary 'look' is Lookup, not text" in text
    assert "'nope' is not an editable field of LookupRequest" in text


def test_an_approval_round_trips_through_yaml_and_renders() -> None:
    graph = validate(refunds().build(), CATALOG)
    assert from_yaml(to_yaml(graph)) == graph
    assert "approval of records.refund_order" in to_text(graph)
    assert any(c.server == "records" and c.method == "refund_order" for c in graph.calls())


def _copy(checkpoints: dict) -> MemoryCheckpoints:
    copy = MemoryCheckpoints()
    copy.values.update(checkpoints)
    return copy


async def test_a_run_stopped_on_one_replica_resumes_on_another_from_sqlite(shop, tmp_path) -> None:
    """Two runtimes (two ingress replicas), one checkpoint file: the second resumes
    the run the first stopped, with every checkpoint read back as its node's type."""
    from servegraph import SqliteCheckpoints

    path = tmp_path / "runs" / "checkpoints.sqlite3"
    first = InProcessRuntime(CATALOG, {"records": shop})
    with pytest.raises(RunWaiting):
        await first.execute(
            refunds().build(), TICKET, run_id="r9", checkpoints=SqliteCheckpoints(path)
        )
    other = Counted(shop.path)
    second = InProcessRuntime(CATALOG, {"records": other})
    store = SqliteCheckpoints(path)
    found, lookup = store.get("r9", "look", Lookup)
    assert found and isinstance(lookup, Lookup) and lookup.record["id"] == "12345"
    result = await second.execute(
        refunds().build(),
        TICKET,
        run_id="r9",
        checkpoints=store,
        decisions={"approve": Verdict("approve", by="lead")},
    )
    assert result.output == "order 12345 refunded $89.90" and other.lookups == 0
    found, decision = store.get("r9", "approve", Decision)
    assert found and decision.decision == "approved" and decision.result["amount"] == "89.90"
    store.put("r9", "approve", decision.model_copy(update={"by": "someone else"}), Decision)
    assert store.get("r9", "approve", Decision)[1].by == "lead"  # the first one stays


SLOW_RUNS: list[str] = []


async def slow(text: str) -> str:
    await asyncio.sleep(0.2)  # still running when the approval stops the run
    SLOW_RUNS.append(text)
    return text.upper()


def both(decision: Decision, shout: str) -> str:
    return f"{reply(decision)} / {shout[:6]}"


def beside(shouting: Any) -> Pipeline:
    """An approval with `shouting` (a node that does not wait on it) running beside it."""
    p = Pipeline("beside", input=Ticket, output=str)
    shout = p.function("shout", shouting, text=p.input.text)
    decision = p.approval(
        "approve",
        records.refund_order(text=p.input.text, email=p.input.email),
        summary=p.input.text,
    )
    p.returns(p.function("both", both, decision=decision, shout=shout))
    return p


async def test_a_stop_lets_the_nodes_that_do_not_wait_on_it_finish_and_be_kept(shop) -> None:
    """A node running beside the approval (a draft, say) is not cut off by the stop:
    it ends and is checkpointed, so the resumed run does not do it again."""
    SLOW_RUNS.clear()
    p = beside(slow)
    runtime, checkpoints = InProcessRuntime(CATALOG, {"records": shop}), MemoryCheckpoints()
    with pytest.raises(RunWaiting):
        await runtime.execute(p.build(), TICKET, run_id="b1", checkpoints=checkpoints)
    assert checkpoints.values[("b1", "shout")] == TICKET["text"].upper()
    decided = {"approve": Verdict("approve", by="lead")}
    result = await runtime.execute(
        p.build(), TICKET, run_id="b1", checkpoints=checkpoints, decisions=decided
    )
    assert result.output == "order 12345 refunded $89.90 / PLEASE" and len(SLOW_RUNS) == 1


async def test_an_approval_is_carried_out_only_for_the_proposal_the_person_read(shop) -> None:
    """Resumed with another proposal than the decision was made on (its checkpoints
    lost, a node run again), the run stops for a decision on it; nothing is applied."""
    runtime, checkpoints = InProcessRuntime(CATALOG, {"records": shop}), MemoryCheckpoints()
    waiting = await stopped(runtime, checkpoints)
    read = waiting.pending.arguments | {"text": "Please refund order 14550"}
    decided = {"approve": Verdict("approve", by="lead", seen=read)}
    with pytest.raises(RunWaiting) as again:
        await runtime.execute(
            refunds().build(), TICKET, run_id="r1", checkpoints=checkpoints, decisions=decided
        )
    assert again.value.pending.arguments == waiting.pending.arguments
    assert refunded(shop) == []
    decided = {"approve": Verdict("approve", by="lead", seen=waiting.pending.arguments)}
    result = await runtime.execute(
        refunds().build(), TICKET, run_id="r1", checkpoints=checkpoints, decisions=decided
    )
    assert result.output == "order 12345 refunded $89.90"


async def fail_later(text: str) -> str:
    await asyncio.sleep(0.1)  # after the approval stopped the run
    raise RuntimeError("the draft's server fell over")


async def test_a_node_failing_beside_a_stop_leaves_the_stop_to_the_caller(shop) -> None:
    p = beside(fail_later)
    runtime = InProcessRuntime(CATALOG, {"records": shop})
    with pytest.raises(RunWaiting):
        await runtime.execute(p.build(), TICKET, run_id="f1", checkpoints=MemoryCheckpoints())
