"""What each request costs (`servegraph.cost`) on the suite's cluster: every model
server's call is charged, the usage's total is the sum of its nodes, and requests a
replica serves at once share its time."""

from __future__ import annotations

import asyncio
import json
import statistics

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(pipelines: LocalCluster) -> httpx.Client:
    from servegraph.security.client import client_headers

    with httpx.Client(base_url=pipelines.base_url, headers=client_headers(), timeout=180) as client:
        yield client


def test_a_rag_answer_is_charged_per_model_server_call_and_in_all(client: httpx.Client) -> None:
    response = client.post("/pipelines/rag", json={"question": "How long do refunds take?"})
    assert response.status_code == 200, response.text
    usage = json.loads(response.headers["x-servegraph-usage"])
    print(f"\nrag x-servegraph-usage: {response.headers['x-servegraph-usage']}")
    nodes = usage["nodes_usd"]
    # Every call to a model server is charged; functions (prompt, rank, ...) are not.
    assert {"embed", "retrieve", "embed_sentences", "generate"} <= set(nodes), usage
    assert all(usd > 0 for usd in nodes.values()), usage
    assert usage["usd"] == pytest.approx(sum(nodes.values()), abs=1e-8)
    assert max(nodes, key=nodes.get) == "generate"  # the LLM is most of it
    assert usage["resource_s"]["cpu_s"] > 0 and usage["joules"] > 0
    # The streamed route reports the same kind of usage in its `usage` event.
    with client.stream(
        "POST", "/pipelines/rag/stream", json={"question": "How long do refunds take?"}
    ) as streamed:
        text = "".join(streamed.iter_text())
    event = text.split("event: usage\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(event)["usd"] > 0


def test_two_requests_served_at_once_are_each_charged_about_half_of_one_alone(
    pipelines: LocalCluster,
) -> None:
    from deployments.catalog import CATALOG
    from servegraph.engine.runtime import NodeRecord, Runtime
    from servegraph.serving.gateway import method_graph
    from servegraph.serving.handles import ServeInvoker

    runtime = Runtime(CATALOG, ServeInvoker(CATALOG))
    graph = runtime.compile(method_graph(CATALOG["embedder"], "embed_one"))

    async def charged(text: str) -> float:
        records: list[NodeRecord] = []
        await runtime.execute(graph, {"text": text}, records=records)
        (record,) = records
        assert record.charge is not None
        return record.charge["cpu_s"]

    async def measure() -> tuple[list[float], list[float]]:
        alone = [await charged(f"refunds take {i} days") for i in range(7)]
        pairs: list[float] = []
        for i in range(7):  # two at once land in one batch of the one replica
            pairs += await asyncio.gather(charged(f"a {i}"), charged(f"b {i}"))
        return alone, pairs

    alone, pairs = asyncio.run(measure())
    ratio = statistics.median(pairs) / statistics.median(alone)
    print(
        f"\nembed_one charge: alone {statistics.median(alone):.4f} CPU-s, "
        f"two at once {statistics.median(pairs):.4f} each, ratio {ratio:.2f}"
    )
    assert 0.3 < ratio < 0.8, (alone, pairs)


def test_a_maximum_cost_stops_before_the_node_it_cannot_afford_or_lowers_max_tokens(
    client: httpx.Client, pipelines: LocalCluster
) -> None:
    """Many callers at once on the real rag, each with its own maximum cost: below the
    first call's cost every one is stopped there (402, naming it and the amounts); with
    room for the encoders but not the LLM's full reply, each is stopped at a node or has
    its max_tokens lowered, and writes no more than that; with room to spare, none is
    touched."""
    from servegraph.security.client import client_headers

    question = {"question": "How long do refunds take after a return?"}
    for _ in range(3):  # the ingress learns what each call costs from every request
        response = client.post("/pipelines/rag", json=question)
        assert response.status_code == 200, response.text
    usage = json.loads(response.headers["x-servegraph-usage"])
    before_llm = usage["usd"] - usage["nodes_usd"]["generate"]
    tiny, spare = [1e-12] * 8, [1.0] * 8
    spread = [before_llm * 3 + i / 15 * 2 * usage["usd"] for i in range(16)]

    async def ask(maximum: float) -> httpx.Response:
        headers = client_headers() | {"x-servegraph-max-cost-usd": repr(maximum)}
        async with httpx.AsyncClient(base_url=pipelines.base_url, timeout=180) as session:
            return await session.post("/pipelines/rag", json=question, headers=headers)

    async def all_at_once() -> list[httpx.Response]:
        return await asyncio.gather(*(ask(m) for m in [*tiny, *spread, *spare]))

    answers = asyncio.run(all_at_once())
    for response in answers[:8]:  # tiny
        assert response.status_code == 402, response.text
        body = response.json()
        assert body["node"] == "embed" and body["budget"]["max_usd"] == 1e-12
        assert body["budget"]["estimate_usd"] > body["budget"]["left_usd"], body
        assert "x-servegraph-max-cost-usd" in body["detail"]
    bit = capped = 0
    for response in answers[8:24]:  # spread
        if response.status_code == 402:
            print(f"\n402: {response.text}")
            assert response.json()["node"] in {"embed", "retrieve", "embed_sentences", "generate"}
            bit += 1
            continue
        assert response.status_code == 200, response.text
        spent = json.loads(response.headers["x-servegraph-usage"])
        if lowered := spent["budget"]["capped"].get("generate"):
            assert spent["llm_output_tokens"] <= lowered["max_tokens"], spent
            assert response.json()["answer"], response.text  # a short answer, still prose
            bit, capped = bit + 1, capped + 1
    for response in answers[24:]:  # spare
        assert response.status_code == 200, response.text
        assert json.loads(response.headers["x-servegraph-usage"])["budget"]["capped"] == {}
    print(f"\nbudgets across rag's cost: {bit}/16 stopped or capped ({capped} capped)")
    assert bit >= 1  # the least of them cannot pay for 160 tokens
    streamed = client.post(
        "/pipelines/rag/stream", json=question, headers={"x-servegraph-max-cost-usd": "1e-12"}
    )
    assert streamed.status_code == 402 and streamed.json()["node"] == "embed"
