"""A request's maximum cost (`servegraph.cost.budget.Budget`): the runtime stops before a call
whose estimated cost does not fit what is left, naming the node and the amounts, and
lowers the LLM's max_tokens to what is left buys. Toy servers charge exact, known
amounts, so every figure here is arithmetic."""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import sys
from collections.abc import Callable

import pytest
from pydantic import BaseModel, Field

from servegraph import (
    BudgetExceededError,
    Catalog,
    InProcessRuntime,
    MethodContract,
    Pipeline,
    ServerSpec,
)
from servegraph.cost.budget import Budget, CostModel, Estimate, allowance
from servegraph.cost.metering import attach
from servegraph.cost.prices import prices
from servegraph.engine.ledger import tokens_within
from servegraph.engine.runtime import NodeRecord
from servegraph.serving.http import runtime_error_body

CPU_S_PER_USD = 1 / prices().usd({"cpu_s": 1.0})
EMBED_USD = 1e-5  # what one embed call costs
CALL_USD, TOKEN_USD = 2e-5, 1e-6  # the model: per call, per output token
REPLY_TOKENS = 50  # the model writes this many, or max_tokens if fewer


class Text(BaseModel):
    text: str


class Vector(BaseModel):
    vector: list[float]


class Prompt(BaseModel):
    text: str
    max_tokens: int = Field(100, ge=1)
    context: list[float] = []


class Tokens(BaseModel):
    input_tokens: int
    output_tokens: int


class Reply(BaseModel):
    text: str
    usage: Tokens


class Pair(BaseModel):
    a: list[float]
    b: list[float]


def charge(usd: float) -> dict[str, float]:
    return {"cpu_s": usd * CPU_S_PER_USD}


class Embedder:
    def __init__(self) -> None:
        self.calls = 0

    async def embed(self, request: Text) -> Vector:
        self.calls += 1
        await asyncio.sleep(0)  # let concurrent runs interleave
        return attach(Vector(vector=[float(len(request.text))]), charge(EMBED_USD))


class Model:
    def __init__(self) -> None:
        self.asked: list[int] = []
        self.allowed: list[float | None] = []

    async def generate(self, request: Prompt) -> Reply:
        self.asked.append(request.max_tokens)
        self.allowed.append(allowance())
        await asyncio.sleep(0)
        n = min(REPLY_TOKENS, request.max_tokens)
        reply = Reply(text="x" * n, usage=Tokens(input_tokens=3, output_tokens=n))
        return attach(reply, charge(CALL_USD + TOKEN_USD * n))


def catalog() -> Catalog:
    embed = MethodContract(Text, Vector, idempotent=True)
    generate = MethodContract(Prompt, Reply, usage="usage", budget_field="max_tokens")
    return Catalog(
        [
            ServerSpec("embedder", {"embed": embed}, "x:y", "E", "/e"),
            ServerSpec("model", {"generate": generate}, "x:y", "M", "/m"),
        ]
    )


def rag() -> Pipeline:
    p = Pipeline("rag", input=Prompt, output=Reply)
    e = p.call("embed", "embedder", "embed", text=p.input.text, idempotent=True, retries=2)
    p.returns(
        p.call(
            "generate",
            "model",
            "generate",
            text=p.input.text,
            max_tokens=p.input.max_tokens,
            context=e.vector,
        )
    )
    return p


def echo_fallback(text: str) -> Vector:
    return Vector(vector=[0.0])


def fan_out() -> Pipeline:
    """Two embeds at once, sharing the request's budget."""
    p = Pipeline("fan", input=Text, output=Pair)
    a = p.call("a", "embedder", "embed", text=p.input.text)
    b = p.call("b", "embedder", "embed", text=p.input.text)
    p.returns(a=a.vector, b=b.vector)
    return p


def runtime() -> tuple[InProcessRuntime, Embedder, Model]:
    embedder, model = Embedder(), Model()
    return InProcessRuntime(catalog(), {"embedder": embedder, "model": model}), embedder, model


async def learned(rt: InProcessRuntime) -> None:
    """Runs that teach the cost model, the model writing 10 and 50 tokens."""
    for max_tokens in (10, 100):
        await rt.run(rag().build(), {"text": "hello", "max_tokens": max_tokens})


# --------------------------------------------------------------------- the estimates


def test_a_method_without_tokens_is_estimated_at_its_recent_charges_mean() -> None:
    costs = CostModel(half_life=1.0)
    assert costs.estimate("embedder", "embed") is None
    for usd in (1.0, 2.0, 4.0):  # weights 1/4, 1/2, 1
        costs.observe("embedder", "embed", usd)
    estimate = costs.estimate("embedder", "embed")
    assert estimate is not None
    assert estimate.per_call == pytest.approx((0.25 + 1.0 + 4.0) / 1.75)
    assert estimate.per_token == 0


def test_a_method_with_tokens_is_a_line_through_its_charges() -> None:
    costs = CostModel()
    for tokens in (10, 20, 40):
        costs.observe("llm", "chat", 3.0 + 0.5 * tokens, tokens)
    estimate = costs.estimate("llm", "chat")
    assert estimate is not None
    assert estimate.per_call == pytest.approx(3.0) and estimate.per_token == pytest.approx(0.5)


def test_without_spread_in_tokens_all_of_the_cost_is_per_token() -> None:
    costs = CostModel()
    for _ in range(3):
        costs.observe("llm", "chat", 6.0, 20)  # every reply ran to max_tokens
    assert costs.estimate("llm", "chat") == Estimate(0.0, pytest.approx(0.3))


def test_a_line_that_would_go_negative_is_clamped_to_cost_per_token() -> None:
    costs = CostModel(half_life=1.0)
    costs.observe("llm", "chat", 1.0, 10)
    costs.observe("llm", "chat", 9.0, 20)  # slope 0.8, intercept -7
    estimate = costs.estimate("llm", "chat")
    assert estimate is not None and estimate.per_call == 0  # the mean cost per token:
    assert estimate.per_token == pytest.approx((0.5 * 1 + 9) / (0.5 * 10 + 20))


def test_the_window_forgets_old_charges() -> None:
    costs = CostModel(window=2, half_life=1e9)  # weights all but equal
    for usd in (100.0, 1.0, 3.0):
        costs.observe("embedder", "embed", usd)
    assert costs.estimate("embedder", "embed") == Estimate(pytest.approx(2.0))


def test_the_estimate_follows_a_change_of_load_within_a_few_calls() -> None:
    """A burst of cheap calls (tokens shared by 32 sequences), then the load drops and a
    token costs four times as much: after 16 calls the estimate is within 10 % of the
    new cost, though 48 of the 64 charges it holds are the old ones."""
    costs = CostModel()
    for i in range(48):
        costs.observe("llm", "chat", 0.25 * (20 + i % 7), 20 + i % 7)
    for i in range(16):
        costs.observe("llm", "chat", 1.0 * (20 + i % 7), 20 + i % 7)
    estimate = costs.estimate("llm", "chat")
    assert estimate is not None and estimate.at(25) == pytest.approx(25.0, rel=0.1)


# ------------------------------------------------------------------ the runtime


async def test_a_method_never_charged_runs_whatever_the_budget() -> None:
    rt, embedder, _ = runtime()
    budget = Budget(1e-12)
    await rt.run(rag().build(), {"text": "hello"}, budget=budget)
    assert embedder.calls == 1
    assert budget.spent_usd == pytest.approx(EMBED_USD + CALL_USD + TOKEN_USD * REPLY_TOKENS)


async def test_calls_that_come_while_the_first_runs_wait_for_its_charge() -> None:
    """A cold runtime, 20 tight budgets at once: the first call of each method runs to
    learn its cost, and the others, waiting for it, are stopped by its charge."""
    rt, embedder, model = runtime()
    budgets = [Budget(EMBED_USD / 2) for _ in range(20)]
    results = await asyncio.gather(
        *(rt.run(rag().build(), {"text": "hi"}, budget=b) for b in budgets),
        return_exceptions=True,
    )
    stopped = [r for r in results if isinstance(r, BudgetExceededError)]
    assert len(stopped) == 19 and {e.node for e in stopped} == {"embed"}
    assert embedder.calls == 1 and len(model.asked) == 1  # the one that learned the costs


async def test_a_budget_below_the_first_call_stops_before_it_naming_it() -> None:
    rt, embedder, model = runtime()
    await learned(rt)
    calls = embedder.calls, len(model.asked)
    records: list[NodeRecord] = []
    with pytest.raises(BudgetExceededError) as caught:
        await rt.execute(rag().build(), {"text": "hi"}, budget=Budget(5e-6), records=records)
    error = caught.value
    assert error.node == "embed" and error.status_code == 402
    assert error.estimate_usd == pytest.approx(EMBED_USD) and error.spent_usd == 0
    assert "$1e-05" in error.detail and "at least $1e-05" in error.detail
    assert (embedder.calls, len(model.asked)) == calls  # nothing ran, nothing retried
    assert [(r.node, r.status) for r in records] == [("embed", "budget")]


async def test_a_budget_that_buys_the_embed_but_not_one_token_stops_at_the_llm() -> None:
    rt, _, model = runtime()
    await learned(rt)
    asked = len(model.asked)
    with pytest.raises(BudgetExceededError) as caught:
        await rt.run(rag().build(), {"text": "hi"}, budget=Budget(EMBED_USD + CALL_USD))
    error = caught.value
    assert error.node == "generate" and len(model.asked) == asked
    assert error.spent_usd == pytest.approx(EMBED_USD)
    assert error.estimate_usd == pytest.approx(CALL_USD + TOKEN_USD)


async def test_the_llm_max_tokens_is_lowered_to_what_is_left_buys() -> None:
    rt, _, model = runtime()
    await learned(rt)
    budget = Budget(EMBED_USD + CALL_USD + TOKEN_USD * 20.5)
    reply = await rt.run(rag().build(), {"text": "hi", "max_tokens": 100}, budget=budget)
    assert model.asked[-1] == 20 and reply.usage.output_tokens == 20
    assert budget.capped == {"generate": {"max_tokens": 20}}
    # The call also carries what was left, for a server that can stop part-way.
    assert model.allowed[-1] == pytest.approx(CALL_USD + TOKEN_USD * 20.5)
    assert model.allowed[:2] == [None, None]  # the runs without a budget
    assert budget.spent_usd <= budget.max_usd and budget.reserved_usd == pytest.approx(0)


async def test_a_budget_that_covers_the_request_leaves_it_alone() -> None:
    rt, _, model = runtime()
    await learned(rt)
    budget = Budget(1.0)
    await rt.run(rag().build(), {"text": "hi", "max_tokens": 100}, budget=budget)
    assert model.asked[-1] == 100 and budget.capped == {}


async def test_a_budget_stop_is_not_replaced_by_the_fallback() -> None:
    rt, _, _ = runtime()
    await learned(rt)
    p = Pipeline("fb", input=Text, output=Vector)
    p.returns(p.call("embed", "embedder", "embed", text=p.input.text, fallback=echo_fallback))
    with pytest.raises(BudgetExceededError):
        await rt.run(p.build(), {"text": "hi"}, budget=Budget(1e-9))


async def test_parallel_calls_share_the_budget() -> None:
    rt, embedder, _ = runtime()
    await learned(rt)
    before = embedder.calls
    with pytest.raises(BudgetExceededError) as caught:
        await rt.run(fan_out().build(), {"text": "hi"}, budget=Budget(1.5 * EMBED_USD))
    assert caught.value.node in ("a", "b") and embedder.calls - before == 1
    budget = Budget(2 * EMBED_USD)
    await rt.run(fan_out().build(), {"text": "hi"}, budget=budget)
    assert budget.spent_usd == pytest.approx(2 * EMBED_USD)


async def test_many_concurrent_requests_each_keep_to_their_own_budget() -> None:
    """200 runs at once on one runtime, budgets from below the first call to above the
    whole request: each stops naming the node it could not afford, or finishes within
    its maximum with max_tokens lowered where it had to be."""
    rt, _, _ = runtime()
    await learned(rt)
    full = EMBED_USD + CALL_USD + TOKEN_USD * REPLY_TOKENS
    maxima = [full * (0.1 + 1.2 * i / 199) for i in range(200)]
    budgets = [Budget(m) for m in maxima]
    results = await asyncio.gather(
        *(rt.run(rag().build(), {"text": "hi"}, budget=b) for b in budgets),
        return_exceptions=True,
    )
    stopped = {"embed": 0, "generate": 0}
    for budget, result in zip(budgets, results, strict=True):
        if isinstance(result, BudgetExceededError):
            stopped[result.node] += 1
            expected = "embed" if budget.max_usd < EMBED_USD else "generate"
            assert result.node == expected
            assert result.estimate_usd > result.left_usd
            continue
        assert isinstance(result, Reply), result
        assert budget.spent_usd <= budget.max_usd * (1 + 1e-9)
        affordable = int((budget.max_usd - EMBED_USD - CALL_USD) / TOKEN_USD)
        assert result.usage.output_tokens == min(REPLY_TOKENS, affordable)
    assert stopped["embed"] > 0 and stopped["generate"] > 0
    assert sum(stopped.values()) < len(budgets)


def llm_only() -> Pipeline:
    p = Pipeline("llm_only", input=Prompt, output=Reply)
    p.returns(p.call("generate", "model", "generate", text=p.input.text))
    return p


@pytest.mark.parametrize("maximum", [1e307, 6.602692196242413e307, sys.float_info.max, math.inf])
async def test_a_maximum_beyond_any_cost_runs_like_an_unbudgeted_request(maximum: float) -> None:
    """Issue 23: what is left over the LLM's price per token was infinite in floats for
    a maximum of 1e307, and turning it into a token count raised (a 502 naming the LLM
    node: "OverflowError: cannot convert float infinity to integer")."""
    rt, _, model = runtime()
    await learned(rt)
    unbudgeted = await rt.run(rag().build(), {"text": "hi", "max_tokens": 100})
    budget = Budget(maximum)
    reply = await rt.run(rag().build(), {"text": "hi", "max_tokens": 100}, budget=budget)
    assert (reply.text, reply.usage) == (unbudgeted.text, unbudgeted.usage)
    assert model.asked[-2:] == [100, 100] and budget.capped == {}
    assert budget.spent_usd == pytest.approx(EMBED_USD + CALL_USD + TOKEN_USD * REPLY_TOKENS)
    assert budget.reserved_usd == pytest.approx(0)
    # What the LLM is told it may spend: what was left, or for infinity no limit at all.
    assert model.allowed[-1] == (None if maximum == math.inf else pytest.approx(maximum))


@pytest.mark.parametrize("maximum", [0.0, -0.0, -1.0, -math.inf, math.nan])
@pytest.mark.parametrize("pipeline", [rag, llm_only])
async def test_a_maximum_of_nothing_less_or_not_a_number_affords_nothing(
    maximum: float, pipeline: Callable[[], Pipeline]
) -> None:
    """Stopped with 402 before the first call that has an estimate: never a call run on
    a NaN budget, never an exception from the arithmetic (a NaN at the LLM was a 502)."""
    rt, embedder, model = runtime()
    await learned(rt)
    calls = embedder.calls, len(model.asked)
    with pytest.raises(BudgetExceededError) as caught:
        await rt.run(pipeline().build(), {"text": "hi"}, budget=Budget(maximum))
    assert caught.value.node == ("embed" if pipeline is rag else "generate")
    assert (embedder.calls, len(model.asked)) == calls


@pytest.mark.parametrize(("maximum", "allowed"), [(math.inf, None), (math.nan, 0.0), (-1.0, 0.0)])
async def test_a_calls_allowance_is_a_number_at_least_zero_or_no_limit(
    maximum: float, allowed: float | None
) -> None:
    """A cold runtime runs each method's first call whatever the budget (to learn its
    cost): what the LLM is told it may spend is still a number >= 0, or None."""
    rt, _, model = runtime()
    await rt.run(rag().build(), {"text": "hi"}, budget=Budget(maximum))
    assert model.allowed == [allowed]


@pytest.mark.parametrize(
    ("usd", "per_token", "tokens"),
    [
        (math.inf, 1e-9, 100),
        (1e307, 1e-9, 100),
        (1.0, 5e-324, 100),  # the price of a token all but nothing: 1 / it is infinite
        (2.5e-9, 1e-9, 2),
        (0.5e-9, 1e-9, 0),
        (0.0, 1e-9, 0),
        (-1.0, 1e-9, 0),
        (-math.inf, 1e-9, 0),
        (math.nan, 1e-9, 0),
        (math.inf, math.inf, 0),
        (1.0, math.inf, 0),
    ],
)
def test_what_is_left_buys_a_token_count_whatever_the_numbers(
    usd: float, per_token: float, tokens: int
) -> None:
    assert tokens_within(usd, per_token, 100) == tokens


def test_the_error_pickles_and_its_body_names_the_node_and_amounts() -> None:
    error = BudgetExceededError("generate", 2e-5, 1e-5, 3e-5, 2e-5)
    again = pickle.loads(pickle.dumps(error))
    assert again.detail == error.detail and again.estimate_usd == 2e-5
    body = runtime_error_body(again)
    assert body["node"] == "generate" and body["error"] == "BudgetExceededError"
    assert body["budget"] == {
        "max_usd": 3e-5,
        "spent_usd": 2e-5,
        "left_usd": 1e-5,
        "estimate_usd": 2e-5,
    }


# ---------------------------------------------------------------------- over HTTP


class Invoker:
    def __init__(self, servers: dict[str, object]) -> None:
        self.servers = servers

    async def __call__(self, server: str, method: str, request: BaseModel) -> object:
        return await getattr(self.servers[server], method)(request)


def test_the_ingress_takes_the_maximum_from_a_header_and_answers_402() -> None:
    from fastapi.testclient import TestClient

    from servegraph.security.client import client_headers
    from servegraph.serving.ingress import build_fastapi

    model = Model()
    servers = {"embedder": Embedder(), "model": model}
    app = build_fastapi({"rag": rag().build()}, catalog(), Invoker(servers))
    client = TestClient(app, headers=client_headers())
    for max_tokens in (10, 100):  # the ingress learns what the calls cost
        assert client.post("/rag", json={"text": "hi", "max_tokens": max_tokens}).status_code == 200

    def ask(maximum: float, path: str = "/rag") -> object:
        return client.post(
            path, json={"text": "hi"}, headers={"x-servegraph-max-cost-usd": str(maximum)}
        )

    stopped = ask(5e-6)
    assert stopped.status_code == 402 and stopped.json()["node"] == "embed"
    assert stopped.json()["budget"]["estimate_usd"] == pytest.approx(EMBED_USD)
    streamed = ask(5e-6, "/rag/stream")  # stopped before any progress: the same 402
    assert streamed.status_code == 402 and streamed.json()["node"] == "embed"
    capped = ask(EMBED_USD + CALL_USD + TOKEN_USD * 20.5)
    usage = json.loads(capped.headers["x-servegraph-usage"])
    assert capped.status_code == 200 and model.asked[-1] == 20
    assert usage["budget"] == {
        "max_usd": pytest.approx(EMBED_USD + CALL_USD + TOKEN_USD * 20.5),
        "capped": {"generate": {"max_tokens": 20}},
    }
    assert usage["usd"] <= usage["budget"]["max_usd"]
    assert ask(0).status_code == 422  # a maximum must be more than nothing
    documented = app.openapi()["paths"]["/rag"]["post"]
    assert "402" in documented["responses"]
    assert "x-servegraph-max-cost-usd" in {p["name"] for p in documented["parameters"]}


@pytest.mark.parametrize("path", ["/rag", "/rag/stream"])
def test_the_maximum_cost_header_is_a_finite_number_up_to_its_bound(path: str) -> None:
    """Issue 23's fuzzing find: x-servegraph-max-cost-usd: 6.602692196242413e+307 was a
    502 from the LLM node. The header is bounded (`MAX_COST_USD`, documented in the
    OpenAPI): past it, or not a finite number above 0, a 422 naming the header."""
    from fastapi.testclient import TestClient

    from servegraph.security.client import client_headers
    from servegraph.serving.ingress import MAX_COST_USD, build_fastapi

    model = Model()
    servers = {"embedder": Embedder(), "model": model}
    app = build_fastapi({"rag": rag().build()}, catalog(), Invoker(servers))
    client = TestClient(app, headers=client_headers())
    for max_tokens in (10, 100):  # the ingress learns what the calls cost
        assert client.post("/rag", json={"text": "hi", "max_tokens": max_tokens}).status_code == 200
    asked = len(model.asked)
    header = "x-servegraph-max-cost-usd"
    refused = {
        "6.602692196242413e+307": "<= 1000000",
        "1e307": "<= 1000000",
        "1.8e308": "finite",  # past the largest float: infinity
        "1000000.5": "<= 1000000",
        "inf": "finite",
        "-Infinity": "finite",
        "nan": "finite",
        "NaN": "finite",
        "-1": "> 0",
        "0": "> 0",
        "-0": "> 0",
        "1e-400": "> 0",  # zero, in floats
        "": "float",
        "a lot": "float",
    }
    for value, fix in refused.items():
        answer = client.post(path, json={"text": "hi", "max_tokens": 100}, headers={header: value})
        assert answer.status_code == 422, (value, answer.status_code, answer.text)
        (problem,) = answer.json()["detail"]
        assert problem["field"] == f"header.{header}" and fix in problem["fix"], (value, problem)
    assert len(model.asked) == asked  # nothing ran
    for value in ("1e6", repr(MAX_COST_USD)):  # the bound itself: as if unbudgeted
        answer = client.post(path, json={"text": "hi", "max_tokens": 100}, headers={header: value})
        assert answer.status_code == 200 and model.asked[-1] == 100, answer.text
    for value in ("inf", "nan", "1e308", "0", "-1"):
        for deadline in ("x-request-timeout", "x-request-timeout-seconds"):
            answer = client.post(path, json={"text": "hi"}, headers={deadline: value})
            assert answer.status_code == 422, (deadline, value, answer.text)
            assert answer.json()["detail"][0]["field"] == f"header.{deadline}"
    documented = app.openapi()["paths"][path]["post"]["parameters"]
    (schema,) = [p["schema"] for p in documented if p["name"] == header]
    assert {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_COST_USD} in schema["anyOf"]
