"""Runs that wait for a person, over HTTP on the suite's platform (`pipelines/agent/
refund.py`): 202 with the run's id, the run as a resource, the decision open only to
`approve:refund`, twenty decisions at once of which one is carried out, a rejection, the
stream's `waiting` event, and the bad requests (unknown run 404, a run not waiting 409).
"""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from servegraph.security.keys import AuthSettings, KeyStore
from tests.sse import sse_events

pytestmark = pytest.mark.integration
TICKET = {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}


@pytest.fixture(scope="module")
def client(pipelines: LocalCluster) -> httpx.Client:
    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=120) as c:
        yield c


def waiting_run(client: httpx.Client) -> str:
    started = client.post("/pipelines/refund", json=TICKET)
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["status"] == "waiting" and started.headers["x-servegraph-run-id"] == body["run_id"]
    awaiting = body["awaiting"]
    assert (awaiting["node"], awaiting["server"], awaiting["method"]) == (
        "approve",
        "records",
        "refund_order",
    )
    assert awaiting["summary"].startswith("Refund of $49.00 asked for order 14550")
    assert awaiting["arguments"]["email"] == "ana@example.com"
    return body["run_id"]


def test_a_run_waits_and_one_of_twenty_decisions_at_once_is_carried_out(
    client: httpx.Client, pipelines: LocalCluster
) -> None:
    run_id = waiting_run(client)
    shown = client.get(f"/pipelines/refund/runs/{run_id}").json()
    assert shown["status"] == "waiting" and shown["nodes_done"] == ["look", "brief"]
    listed = client.get(
        "/pipelines/refund/runs", params={"status": "waiting", "limit": 500}
    ).json()["runs"]
    assert run_id in {r["run_id"] for r in listed}
    documented = client.get("/pipelines/openapi.json").json()["paths"]["/refund"]["post"]
    assert "202" in documented["responses"]  # the stop, with its run's id

    # A key that may run the pipeline may not decide.
    writer = KeyStore(AuthSettings().store_path).create(
        f"it-refunds-{secrets.token_hex(4)}", ["invoke:refund"]
    )
    refused = client.post(
        f"/pipelines/refund/runs/{run_id}/decision",
        json={"decision": "approve"},
        headers={"authorization": f"Bearer {writer}"},
    )
    assert refused.status_code == 403 and "approve:refund" in refused.text

    async def twenty() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            headers=client_headers(), base_url=pipelines.base_url, timeout=120
        ) as c:
            decision = f"/pipelines/refund/runs/{run_id}/decision"
            return await asyncio.gather(
                *(c.post(decision, json={"decision": "approve"}) for _ in range(20))
            )

    answers = asyncio.run(twenty())
    assert sorted(a.status_code for a in answers) == [200] + [409] * 19, [a.text for a in answers]
    done = next(a.json() for a in answers if a.status_code == 200)
    assert done["status"] == "finished"
    # Refunded, or refused as already refunded by an earlier run of the suite here.
    assert done["output"]["outcome"] in ("refunded", "refused"), done
    conflict = next(a.json() for a in answers if a.status_code == 409)
    assert conflict["status"] in ("running", "finished") and conflict["run_id"] == run_id
    shown = client.get(f"/pipelines/refund/runs/{run_id}").json()
    assert shown["status"] == "finished" and shown["output"] == done["output"]
    assert [d["by"] for d in shown["decisions"]] == ["local-admin"]
    assert "approve" in shown["nodes_done"]
    again = client.post(f"/pipelines/refund/runs/{run_id}/decision", json={"decision": "reject"})
    assert again.status_code == 409 and again.json()["status"] == "finished"


def test_a_rejected_run_hands_off_and_bad_requests_are_named(client: httpx.Client) -> None:
    run_id = waiting_run(client)
    rejected = client.post(
        f"/pipelines/refund/runs/{run_id}/decision",
        json={"decision": "reject", "reason": "the parcel was delivered"},
    )
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["status"] == "rejected"
    assert rejected.json()["output"]["outcome"] == "handed_off"
    missing = client.get("/pipelines/refund/runs/no-such-run")
    assert missing.status_code == 404 and "no-such-run" in missing.text
    waiting = waiting_run(client)
    bad = client.post(
        f"/pipelines/refund/runs/{waiting}/decision",
        json={"decision": "approve", "arguments": {"amount": "-1"}},
    )
    assert bad.status_code == 422 and "amount" in bad.text, bad.text
    other = client.post(
        f"/pipelines/refund/runs/{waiting}/decision",
        json={"decision": "approve", "arguments": {"email": "sam@example.com"}},
    )
    assert other.status_code == 422 and "arguments.email" in other.text, other.text
    # A broken edit uses up no decision: the run still waits.
    assert client.get(f"/pipelines/refund/runs/{waiting}").json()["status"] == "waiting"


def test_the_stream_ends_with_what_the_run_waits_for(client: httpx.Client) -> None:
    streamed = client.post("/pipelines/refund/stream", json=TICKET)
    assert streamed.status_code == 200, streamed.text
    events = sse_events(streamed.text)
    name, data = events[-1]
    assert name == "waiting" and data["awaiting"]["node"] == "approve", events
    shown = client.get(f"/pipelines/refund/runs/{data['run_id']}").json()
    assert shown["status"] == "waiting"
