"""Per-key LLM token limits hold for what the engine did, whatever became of the caller,
and requests running at once see each other (issue 24, finding 2), without Ray: the
token buckets' reserve and settle on a fake clock, the guard against a fake limiter,
and the pipeline ingress and an OpenAI-like route over ASGI with many callers at once,
a caller who hangs up mid-stream, and a deadline shorter than the generation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.llm import metering
from deployments.llm.contract import ChatChunk, ChatRequest, ChatResponse, Message, Usage
from servegraph import Catalog, InProcessRuntime, MethodContract, Pipeline, ServerSpec
from servegraph.engine.tokens import PromptEstimate, Tally, most_output_tokens
from servegraph.security.endpoints import guard_endpoint
from servegraph.security.guard import Guard
from servegraph.security.keys import AuthSettings, Caller, KeyStore
from servegraph.security.limits import Limiter
from servegraph.server import report_tokens
from servegraph.serving.ingress import build_fastapi
from tests.auth_fakes import Clock, KeyUsage, guard_on

PROMPT_TOKENS = 50  # what the fake LLM reports for every prompt
MAX_TOKENS = 30  # what the pipeline asks the fake LLM for


class SharedLimiter:
    """The shared limiter actor as replicas see it: a `Limiter` that answers each call
    after a hop (an await), so requests arriving together interleave there."""

    def __init__(self) -> None:
        self.limiter = Limiter(clock=Clock())  # the clock stands still: no refill

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.limiter, name)

        async def call(*args: Any) -> Any:
            await asyncio.sleep(0)
            return method(*args)

        return call


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite3", cache_s=0)


@pytest.fixture
def guard(store: KeyStore) -> Iterator[Guard]:
    metering._ESTIMATES.clear()  # each test learns its routes' prompts afresh
    with guard_on(store.path, limiter=SharedLimiter()) as guard:
        yield guard


def bucket(guard: Guard) -> Limiter:
    limiter: Limiter = guard.limiter.limiter
    return limiter


async def settled(guard: Guard, key: str, n: int = 1) -> list[dict[str, int]]:
    """The tokens charged to `key` once `n` of its answers are recorded (a charge may
    land after the response, when its stream is closed)."""
    deadline = time.monotonic() + 10
    while True:
        charged = [t for name, s, t in guard.usage.seen if name == key and s != 429 and t]
        if len(charged) >= n:
            await asyncio.sleep(0.01)  # the budget's update, in its own task, lands too
            return charged
        assert time.monotonic() < deadline, f"{key} was not charged: {guard.usage.seen}"
        await asyncio.sleep(0.01)


# -- the buckets and the guard ------------------------------------------------------


def test_a_reservation_is_taken_while_the_balance_is_positive_and_settled_by_use() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    assert limiter.reserve("k", 500, 600) == 0  # 600 -> 100
    assert limiter.reserve("k", 500, 600) == 0  # 100 is positive: taken, into debt
    wait = limiter.reserve("k", 500, 600)  # refused, nothing taken
    assert wait == pytest.approx((1 + 400) / 10)  # until the balance is positive: 40.1 s
    assert limiter.balance("k", 600) == -400
    assert limiter.settle("k", 500, 120, 600) == -20  # 380 reserved and not used: back
    assert limiter.settle("k", 500, 650, 600) == -170  # 150 used beyond its reservation
    clock.now += 120
    assert limiter.balance("k", 600) == 600  # refilled, never past the bucket
    assert limiter.reserve("k", 100, 600) == 0
    assert limiter.settle("k", 100, 0, 600) == 600  # a refund never fills past it either
    assert limiter.spend("k", 900, 600) == -300  # an answer without a reservation


async def test_the_guard_reserves_before_the_call_and_settles_after(tmp_path: Path) -> None:
    class FakeLimiter:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []
            self.wait = 0.0

        def reserve(self, *args: Any) -> float:
            self.calls.append(("reserve", *args))
            return self.wait

        def settle(self, *args: Any) -> float:
            self.calls.append(("settle", *args))
            return 0.0

    fake = FakeLimiter()
    settings = AuthSettings(keys=tmp_path / "keys.sqlite3", cache_s=0)
    guard = Guard(settings, limiter=fake, usage=KeyUsage())
    limited = Caller("k", frozenset({"llm"}), tokens_per_min=600)
    reserved = await guard.reserve(limited, 130)
    await guard.charge(limited, 200, {"input": 100, "output": 7}, reserved=reserved)
    # A request that used nothing (refused by the engine) gets all of it back.
    await guard.charge(limited, 400, {}, reserved=await guard.reserve(limited, 40))
    assert fake.calls == [
        ("reserve", "k", 130, 600),
        ("settle", "k", 130, 107, 600),
        ("reserve", "k", 40, 600),
        ("settle", "k", 40, 0, 600),
    ]
    fake.wait = 3.2
    with pytest.raises(Exception) as refused:
        await guard.reserve(limited, 10)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "4"  # type: ignore[attr-defined]
    # A key without a token limit never calls the limiter.
    fake.calls.clear()
    free = Caller("f", frozenset({"llm"}), requests_per_s=5)
    assert await guard.reserve(free, 130) == 0
    await guard.charge(free, 200, {"input": 100, "output": 7})
    assert fake.calls == []


async def test_a_charge_outlives_the_cancelled_request_that_makes_it(tmp_path: Path) -> None:
    """An ASGI server cancels the task of a response whose client is gone, and keeps
    cancelling its awaits: the budget's update still happens."""
    limiter = SharedLimiter()
    settings = AuthSettings(keys=tmp_path / "keys.sqlite3", cache_s=0)
    guard = Guard(settings, limiter=limiter, usage=KeyUsage())
    caller = Caller("k", frozenset({"llm"}), tokens_per_min=600)
    charging = asyncio.ensure_future(guard.charge(caller, 499, {"input": 70, "output": 5}))
    await asyncio.sleep(0)
    charging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await charging
    for _ in range(10):
        await asyncio.sleep(0)
    assert limiter.limiter.balance("k", 600) == 600 - 75


async def test_a_reservation_whose_client_hangs_up_while_it_is_taken_goes_back(
    tmp_path: Path,
) -> None:
    """The request is cancelled while the limiter takes its reservation, so it will
    never settle it: the guard gives it back once the limiter has answered. A refused
    reservation took nothing and gives nothing back."""
    from servegraph.security import guard as module

    class ActorLimiter(SharedLimiter):
        """As the Ray actor answers: a call, once sent, runs whether or not its caller
        still awaits the answer (cancelling an ObjectRef's await cancels the wait)."""

        def __getattr__(self, name: str) -> Callable[..., Any]:
            call = super().__getattr__(name)
            sent: set[asyncio.Future[Any]] = set()

            def send(*args: Any) -> Any:
                task = asyncio.ensure_future(call(*args))
                sent.add(task)
                task.add_done_callback(sent.discard)
                return asyncio.shield(task)

            return send

    limiter = ActorLimiter()  # its clock stands still: no refill
    settings = AuthSettings(keys=tmp_path / "keys.sqlite3", cache_s=0)
    guard = Guard(settings, limiter=limiter, usage=KeyUsage())
    caller = Caller("k", frozenset({"llm"}), tokens_per_min=600)

    async def hang_up_while_reserving(tokens: int) -> None:
        earlier = set(module._OUTLIVING)  # (another test's, left on its closed loop)
        reserving = asyncio.ensure_future(guard.reserve(caller, tokens))
        await asyncio.sleep(0)  # waiting for the limiter's answer
        reserving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserving
        await until(
            lambda: not module._OUTLIVING - earlier, "the limiter's answer and any give-back"
        )

    await hang_up_while_reserving(500)  # taken, then given back
    assert limiter.limiter.balance("k", 600) == 600
    assert await guard.reserve(caller, 700) == 700  # a request that stays: into debt
    await hang_up_while_reserving(100)  # refused: nothing to give back
    assert limiter.limiter.balance("k", 600) == -100


# -- an OpenAI route ------------------------------------------------------------------


def client(app: Any, key: str | None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app", headers=headers
    )


def refused(guard: Guard, key: str) -> int:
    return sum(s == 429 for n, s, _ in guard.usage.seen if n == key)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_twenty_requests_at_once_with_one_answer_left_overspend_one_reservation(
    guard: Guard, store: KeyStore
) -> None:
    """An OpenAI-like chat route: each answer uses its prompt (400 characters, 100
    tokens) and max_tokens (20); the key has one answer and a bit left. Of 20 requests
    sent at once, those that find the budget spent by the others' reservations are
    refused: the overspend is at most one request's reservation, not 19 answers."""
    started, gate = [], asyncio.Event()

    async def chat(body: dict, request: Request) -> JSONResponse:
        started.append(body)
        await gate.wait()  # the engine is generating; the others arrive meanwhile
        return JSONResponse({"usage": {"prompt_tokens": 100, "completion_tokens": 20}})

    app = FastAPI()
    app.post("/v1/chat")(
        guard_endpoint(chat, "llm", llm=True, meter=metering.meter("chat", lambda: 2048))
    )
    key = store.create("parallel", ["llm"], tokens_per_min=6000)
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 20}
    async with client(app, key) as c:
        gate.set()
        assert (await c.post("/v1/chat", json=body)).status_code == 200  # teaches the prompt
        gate.clear()
        one_answer = 120
        left = one_answer + 10
        bucket(guard).spend("parallel", bucket(guard).balance("parallel", 6000) - left, 6000)
        burst = asyncio.gather(*(c.post("/v1/chat", json=body) for _ in range(20)))
        await until(
            lambda: len(started) - 1 + refused(guard, "parallel") == 20,
            "every request to be refused or started",
        )
        gate.set()
        answers = await burst
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 2 and statuses.count(429) == 18, statuses
    # What the reservation was: the prompt as learned (100) and max_tokens (20).
    overspend = -bucket(guard).balance("parallel", 6000)
    assert 0 < overspend <= one_answer  # at most one request's reservation
    refusal = next(a for a in answers if a.status_code == 429)
    assert int(refusal.headers["retry-after"]) >= 1


# -- the pipeline ingress -------------------------------------------------------------


class TokenLLM:
    """A fake LLM that reports its tokens as they are generated, as `LLMClient` does
    from the engine's usage on every chunk: a prompt of `PROMPT_TOKENS`, then a token a
    word. After its last word it writes the reply's end (one more token, no chunk) and,
    with `hang`, stays there until released (a caller may leave meanwhile)."""

    def __init__(self, words: int = 6, hang: bool = False) -> None:
        self.words = words
        self.hang = hang
        self.release = asyncio.Event()
        self.cancelled = False

    async def chat(self, request: ChatRequest) -> ChatResponse:
        reply = None
        async for item in self.chat_stream(request):
            reply = item
        assert isinstance(reply, ChatResponse)
        return reply

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[Any]:
        try:
            for i in range(1, self.words + 1):
                report_tokens(PROMPT_TOKENS, i)
                await asyncio.sleep(0)
                yield ChatChunk(text=f"w{i} ")
            report_tokens(PROMPT_TOKENS, self.words + 1)
            if self.hang:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        usage = Usage(input_tokens=PROMPT_TOKENS, output_tokens=self.words + 1)
        yield ChatResponse(text="w " * self.words, finish_reason="stop", usage=usage, model="m")


LLM_CATALOG = Catalog(
    [
        ServerSpec(
            "llm",
            {
                "chat": MethodContract(
                    ChatRequest,
                    ChatResponse,
                    chunk=ChatChunk,
                    stream_method="chat_stream",
                    usage="usage",
                    budget_field="max_tokens",
                )
            },
            "x:y",
            "L",
            "/l",
        )
    ]
)


class Question(BaseModel):
    text: str


def to_messages(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


def reply_text(reply: ChatResponse) -> str:
    return reply.text


def ask() -> Pipeline:
    p = Pipeline("ask", input=Question, output=str)
    messages = p.function("prompt", to_messages, text=p.input.text)
    reply = p.call("generate", "llm", "chat", messages=messages, max_tokens=MAX_TOKENS, stream=True)
    p.returns(p.function("answer", reply_text, reply=reply))
    return p


class Invoker:
    def __init__(self, servers: dict[str, Any]) -> None:
        self.servers = servers

    async def __call__(self, server: str, method: str, request: BaseModel) -> Any:
        return await getattr(self.servers[server], method)(request)

    def stream(self, server: str, method: str, request: BaseModel) -> AsyncIterator[Any]:
        result: AsyncIterator[Any] = getattr(self.servers[server], method)(request)
        return result


def ingress(llm: TokenLLM) -> FastAPI:
    return build_fastapi({"ask": ask().build()}, LLM_CATALOG, Invoker({"llm": llm}))


async def hang_up_after_chunks(app: Any, key: str, chunks: int) -> bytes:
    """POST /ask/stream as a client that reads `chunks` chunk events and hangs up, over
    raw ASGI as Serve's proxy runs the app (ASGI spec 2.3: the server says
    `http.disconnect`, and Starlette cancels the response)."""
    payload = json.dumps({"text": "a question"}).encode()
    pending = [{"type": "http.request", "body": payload, "more_body": False}]
    gone = asyncio.Event()
    sent: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if b"".join(sent).count(b"event: chunk") >= chunks:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/ask/stream",
        "raw_path": b"/ask/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"app"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("app", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 10)
    return b"".join(sent)


async def test_a_stream_left_after_its_last_chunk_is_charged_the_tokens_generated(
    guard: Guard, store: KeyStore
) -> None:
    """The caller reads every chunk of the answer and hangs up while the LLM is still
    writing the reply's end: the key is charged the prompt and every token generated up
    to then, not nothing."""
    llm = TokenLLM(words=6, hang=True)
    key = store.create("leaver", ["invoke:ask"], tokens_per_min=100_000)
    body = await hang_up_after_chunks(ingress(llm), key, chunks=6)
    assert body.count(b"event: chunk") == 6 and b"event: result" not in body
    [charged] = await settled(guard, "leaver")
    assert charged == {"input": PROMPT_TOKENS, "output": 6 + 1}
    assert ("leaver", 499, charged) in guard.usage.seen
    await until(lambda: llm.cancelled, "the generation to be cancelled")
    # The budget was charged that, in place of the reservation (prompt + max_tokens).
    await until(
        lambda: bucket(guard).balance("leaver", 100_000) == 100_000 - (PROMPT_TOKENS + 7),
        "the reservation to be settled",
    )


async def test_a_deadline_shorter_than_the_generation_is_charged_what_was_generated(
    guard: Guard, store: KeyStore
) -> None:
    llm = TokenLLM(words=4, hang=True)
    key = store.create("hasty", ["invoke:ask"], tokens_per_min=100_000)
    async with client(ingress(llm), key) as c:
        answer = await c.post(
            "/ask", json={"text": "a question"}, headers={"x-request-timeout": "0.3"}
        )
    assert answer.status_code == 504
    [charged] = await settled(guard, "hasty")
    assert charged == {"input": PROMPT_TOKENS, "output": 4 + 1}


async def test_twenty_pipeline_requests_at_once_overspend_one_reservation_at_most(
    guard: Guard, store: KeyStore
) -> None:
    llm = TokenLLM(words=MAX_TOKENS - 1, hang=True)  # it writes max_tokens in all
    app = ingress(llm)
    key = store.create("crowd", ["invoke:ask"], tokens_per_min=60_000)
    one_answer = PROMPT_TOKENS + MAX_TOKENS
    async with client(app, key) as c:
        llm.release.set()
        assert (await c.post("/ask", json={"text": "warm"})).status_code == 200  # learns
        llm.release.clear()
        bucket(guard).spend(
            "crowd", bucket(guard).balance("crowd", 60_000) - one_answer - 5, 60_000
        )
        burst = asyncio.gather(*(c.post("/ask", json={"text": "warm"}) for _ in range(20)))
        await until(lambda: refused(guard, "crowd") >= 18, "the requests past the budget refused")
        llm.release.set()
        answers = await burst
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 2 and statuses.count(429) == 18, statuses
    assert 0 < -bucket(guard).balance("crowd", 60_000) <= one_answer


# -- the parts -----------------------------------------------------------------------


async def test_a_failed_calls_tokens_are_on_the_runs_tally_and_its_record() -> None:
    class Breaks(TokenLLM):
        async def chat_stream(self, request: ChatRequest) -> AsyncIterator[Any]:
            report_tokens(PROMPT_TOKENS, 3)
            raise ConnectionError("the engine died")
            yield  # an async generator

    tally, records = Tally(), []
    with pytest.raises(Exception, match="engine died"):
        await InProcessRuntime(LLM_CATALOG, {"llm": Breaks()}).execute(
            ask().build(), {"text": "q"}, tally=tally, records=records
        )
    assert tally.totals() == {"input": PROMPT_TOKENS, "output": 3}
    [generate] = [r for r in records if r.node == "generate"]
    assert generate.status == "error" and generate.usage == {"input": PROMPT_TOKENS, "output": 3}
    # A call that ends well: its response's usage, once.
    tally = Tally()
    result = await InProcessRuntime(LLM_CATALOG, {"llm": TokenLLM(words=2)}).execute(
        ask().build(), {"text": "q"}, tally=tally
    )
    assert tally.totals() == {"input": PROMPT_TOKENS, "output": 3}
    [generate] = [r for r in result.nodes if r.node == "generate"]
    assert generate.usage == {"input": PROMPT_TOKENS, "output": 3}


def test_a_pipelines_most_output_tokens_come_from_its_graph_and_request() -> None:
    graph = ask().build()
    assert most_output_tokens(graph, LLM_CATALOG, Question(text="q")) == MAX_TOKENS


def test_a_prompt_estimate_learns_what_prompts_need_beyond_their_characters() -> None:
    estimate = PromptEstimate(window=2)
    assert estimate(400) == 100  # characters / 4
    estimate.observe(400, 130)  # a chat template added 30
    assert estimate(40) == 10 + 30
    estimate.observe(40, 12)
    estimate.observe(40, 12)  # the 30 left the window
    assert estimate(40) == 12
