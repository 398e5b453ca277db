"""Refunds with a person's approval: the order is looked up for the customer, a person
reads what is asked and decides, and the refund is applied once.

    look (records.lookup_order) ─► brief ─► approve (approval: records.refund_order)
    ─► reply

`POST /pipelines/refund` answers 202 with the run's id and what it awaits; a key with
`approve:refund` decides (`POST /pipelines/refund/runs/<id>/decision`), and the run
resumes on any ingress replica from its checkpoints. The reply tells the customer the
outcome: refunded, refused and why, or handed off (rejected, or not decided in a day).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from deployments.records import records
from deployments.records.contract import ActionResult, Lookup
from pipelines.agent.models import Email
from servegraph import Decision, Pipeline

APPROVAL_EXPIRES_S = 24 * 3600.0
EXAMPLES = {
    "refund": {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}
}


class RefundTicket(BaseModel):
    text: str = Field(min_length=3, max_length=4000, description="The ticket: its order number.")
    email: Email = Field(
        description="The customer, as the calling application authenticated them: only "
        "their own order is refunded."
    )


class RefundReply(BaseModel):
    outcome: str = Field(description="refunded, refused or handed_off")
    reply: str = Field(description="What the customer is told.")


def brief(found: Lookup, text: str) -> str:
    """What the person reads before deciding."""
    if found.record is None:
        return f"Refund asked, but {found.message}. Ticket: {text}"
    return f"Refund of {found.record['total']} asked for {found.message}. Ticket: {text}"


def reply(decision: Decision) -> RefundReply:
    if decision.decision == "approved" and decision.result is not None:
        done = ActionResult.model_validate(decision.result)
        if done.outcome == "done":
            return RefundReply(outcome="refunded", reply=f"Done: {done.message}.")
        return RefundReply(outcome="refused", reply=f"We could not refund it: {done.message}.")
    return RefundReply(
        outcome="handed_off",
        reply="A member of our team will look at your request and write to you.",
    )


def build_pipeline() -> Pipeline:
    p = Pipeline("refund", input=RefundTicket, output=RefundReply, deadline_s=60)
    found = p.call("look", records.lookup_order(text=p.input.text, email=p.input.email))
    summary = p.function("brief", brief, found=found, text=p.input.text)
    decision = p.approval(
        "approve",
        records.refund_order(text=p.input.text, email=p.input.email),
        summary=summary,
        expires_s=APPROVAL_EXPIRES_S,
        editable=["amount", "reason"],  # a partial refund; never the order or the customer
    )
    p.returns(p.function("reply", reply, decision=decision))
    return p
