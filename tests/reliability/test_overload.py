"""An overload burst: far more concurrent requests than the platform can serve. Every
request is answered (never left hanging), what cannot be admitted is refused with
503 + Retry-After naming what is full, what runs out of time is a JSON 504 naming the
node, and nothing is a bare 500.

How *fast* those answers come is a figure, not a test: `benchmarks.reliability`
measures it (answers within deadline + 5 s, refusal latency). Asserting it here made
the suite pass or fail with the machine's load: on CI's 2 cores one run's 504s left at
15 s for a 10 s deadline, because the ingress replica's event loop shares a core with
the proxy, the model servers and this test's own client."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from benchmarks.traffic import burst, proxy_gating
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers

pytestmark = pytest.mark.reliability

DEADLINE_S = 10
# Over twice what triage admits (128 in flight); benchmarks.reliability sends 1,200.
BURST = 300


def test_a_burst_past_capacity_is_shed_and_every_request_answered(
    pipelines: LocalCluster,
) -> None:
    proxy_gating(pipelines.base_url)  # not yet right after a deploy
    tickets = [
        {"text": f"My invoice {n} shows a charge I do not recognise.", "email": "ana@example.com"}
        for n in range(BURST)
    ]
    answers = asyncio.run(
        burst(
            pipelines.base_url,
            "/pipelines/triage",
            tickets,
            headers={"X-Request-Timeout": str(DEADLINE_S)},
            client_timeout_s=DEADLINE_S + 60,
        )
    )
    statuses = Counter(a.status for a in answers)
    # Triage admits 128 in flight, and the proxy lets no more than that through: the
    # rest are refused at the proxy's front door, before Serve's router or the ingress
    # spends anything on them (issue 23).
    at_the_door = [
        a
        for a in answers
        if a.status == 503 and isinstance(a.body, dict) and "this proxy" in a.body["detail"]
    ]
    assert at_the_door, statuses
    # Every request got an answer of one of these kinds: nothing hung past the client's
    # generous timeout, nothing failed bare.
    assert set(statuses) <= {200, 503, 504}, statuses
    assert statuses[503] > 0, f"a burst of {BURST} was not shed at all: {statuses}"
    for answer in answers:
        if answer.status == 503:
            assert answer.headers is not None and int(answer.headers["retry-after"]) >= 1
            if isinstance(answer.body, dict):  # refused by the platform: names what is full
                detail = answer.body["detail"]
                assert answer.body["node"], answer.body
                assert "queue is full" in detail or "max_in_flight" in detail, answer.body
            else:  # refused by Serve's proxy: the ingress itself is full
                assert "backpressure" in answer.body, answer.body
        if answer.status == 504:
            assert answer.body["node"] and answer.body["error"] == "NodeTimeoutError"


def test_the_platform_serves_normally_after_the_burst(pipelines: LocalCluster) -> None:
    import httpx

    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=180) as client:
        response = client.post(
            "/pipelines/rag", json={"question": "How long do refunds take after a return?"}
        )
    assert response.status_code == 200, response.text


def test_serves_own_deadline_header_is_honoured_too(pipelines: LocalCluster) -> None:
    import httpx

    with httpx.Client(headers=client_headers(), base_url=pipelines.base_url, timeout=60) as client:
        response = client.post(
            "/pipelines/rag",
            json={"question": "How long do refunds take after a return?", "max_tokens": 512},
            headers={"x-request-timeout-seconds": "1.5"},
        )
    # Answered by the platform (a JSON 504 naming the node), before Serve's proxy
    # would answer its own bare 408 at the same deadline.
    assert response.status_code == 504, response.text
    assert response.json()["node"]
