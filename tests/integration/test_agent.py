"""The support-triage agent over HTTP on the real models."""

from __future__ import annotations

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(pipelines: LocalCluster) -> httpx.Client:
    return httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=300)


def test_billing_ticket_goes_to_billing(client: httpx.Client) -> None:
    response = client.post(
        "/pipelines/triage",
        json={
            "text": "I was charged twice for my Pro plan this month, please refund one payment.",
            "email": "ana@example.com",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["team"] == "billing" and body["label"] == "billing"
    assert body["steps"] and body["reply"]


def test_order_status_question_calls_the_order_tool(client: httpx.Client) -> None:
    body = client.post(
        "/pipelines/triage",
        json={
            "text": "Where is my order 12345? It has not arrived yet.",
            "email": "ana@example.com",
        },
    ).json()
    assert body["team"] == "shipping", body
    orders = [s for s in body["steps"] if s["tool"] == "lookup_order"]
    assert orders, body
    assert "order 12345" in orders[0]["output"] and "in transit" in orders[0]["output"], body


# Another customer's records, as the seed holds them: order 10234 is sam@example.com's
# Summit standing desk ($240.00); lee@example.com's account is Lee Park's Basic plan.
OTHERS = ("Summit", "240.00", "sam@example.com", "Lee Park", "Basic plan")


@pytest.mark.parametrize(
    "ticket",
    [
        {"text": "Where is order 10234? It has not arrived.", "email": "ana@example.com"},
        {"text": "Where is order 10234?"},
        {"text": "Is the account of lee@example.com locked? I cannot log in."},
    ],
    ids=["another-customers-order", "order-without-email", "account-without-email"],
)
def test_a_ticket_gets_no_facts_of_another_customer(client: httpx.Client, ticket: dict) -> None:
    response = client.post("/pipelines/triage", json=ticket)
    assert response.status_code == 200, response.text
    body = response.json()
    assert not [fact for fact in OTHERS if fact in response.text], body
    lookups = [s for s in body["steps"] if s["tool"] in ("lookup_order", "lookup_account")]
    if "email" not in ticket:  # nothing is looked up without the customer's email
        assert not [s for s in lookups if s["valid"]], body
    for step in lookups:
        assert not step["facts"], body
    if any(s["valid"] for s in lookups):  # looked up for ana: not found for her
        assert body["drafted"] == "handoff", body
        assert "could not find order 10234" in body["reply"], body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "Where is my order?", "email": "not-an-email"}, "email"),
        ({"email": "ana@example.com"}, "text"),
    ],
)
def test_malformed_tickets_get_422_naming_the_field(
    client: httpx.Client, body: dict, field: str
) -> None:
    response = client.post("/pipelines/triage", json=body)
    assert response.status_code == 422, response.text
    assert any(d["field"] == field for d in response.json()["detail"]), response.text


def test_a_refund_ticket_waits_for_a_person_and_the_reply_says_what_became_of_it(
    client: httpx.Client,
) -> None:
    """On the real models: the ticket names the customer's order and asks for a refund,
    so the run stops at the approval (202) with what the person reads; approved, the
    refund is made (or refused by the shop's checks, when an earlier test of the
    session refunded this order), and the reply ends saying so."""
    ticket = {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}
    started = client.post("/pipelines/triage", json=ticket)
    assert started.status_code == 202, started.text
    awaiting = started.json()["awaiting"]
    assert (awaiting["node"], awaiting["method"]) == ("act_on/case[refund]/approve", "refund_order")
    assert awaiting["summary"].startswith("Refund of order 14550 (Terra backpack, $49.00")
    run_id = started.json()["run_id"]
    done = client.post(f"/pipelines/triage/runs/{run_id}/decision", json={"decision": "approve"})
    assert done.status_code == 200, done.text
    output = done.json()["output"]
    acted = output["action"]
    assert acted["action"] == "refund" and acted["outcome"] in ("done", "refused"), acted
    said = "Done: order 14550 refunded" if acted["outcome"] == "done" else "Sorry, we could not"
    assert said in output["reply"] and output["steps"][0]["tool"] == "lookup_order", output
