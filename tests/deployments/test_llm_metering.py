"""The LLM's token metering for per-key limits (issue 24, finding 2), without an engine:
the OpenAI routes' requests are sized before the call, a stream always asks the engine
for its usage (and the caller gets only the usage it asked for), every route that runs
the model is counted; and `LLMClient` reports a pipeline call's tokens as they arrive,
so a call cut short still counts them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.llm import metering
from deployments.llm.client import LLMClient
from deployments.llm.contract import ChatRequest, ChatResponse, Message
from deployments.llm.ingress import METERED, UNMETERED
from servegraph.cost.metering import CHARGE_ITEM
from servegraph.engine.tokens import Incurred, counting
from servegraph.security.endpoints import guard_endpoint
from servegraph.security.guard import Guard
from servegraph.security.keys import KeyStore
from tests.auth_fakes import guard_on

PROMPT = "word " * 1600  # 8,000 characters: 2,000 tokens by the estimate


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite3", cache_s=0)


@pytest.fixture
def guard(store: KeyStore) -> Iterator[Guard]:
    metering._ESTIMATES.clear()
    with guard_on(store.path) as guard:
        yield guard


def chunk(content: str | None, usage: tuple[int, int] | None, index: int = 0) -> str:
    """One chunk of vLLM's chat stream, as it serializes it (`exclude_unset`)."""
    data: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    data["choices"] = [] if content is None else [{"index": index, "delta": {"content": content}}]
    if usage is not None:
        data["usage"] = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        }
    return "data: " + json.dumps(data, separators=(",", ":")) + "\n\n"


def engine_stream(prompt_tokens: int, words: list[str]) -> list[str]:
    """What the engine streams when asked for usage on every chunk: a chunk a word, each
    with the usage so far, the usage chunk, [DONE] (Ray batches several in a piece)."""
    pieces = [chunk(w, (prompt_tokens, i + 1)) for i, w in enumerate(words)]
    pieces.append(chunk(None, (prompt_tokens, len(words))) + "data: [DONE]\n\n")
    return pieces


def events(text: str) -> list[Any]:
    return [
        json.loads(e.removeprefix("data: ")) if e.startswith("data: {") else e
        for e in text.split("\n\n")
        if e
    ]


# -- the OpenAI routes' requests -------------------------------------------------------


def test_a_stream_asks_the_engine_for_usage_on_every_chunk_whatever_the_caller_asked() -> None:
    from ray.serve.llm.openai_api_models import ChatCompletionRequest
    from vllm.entrypoints.serve.utils.api_utils import should_include_usage

    body = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=1, stream=True
    )
    meter = metering.OpenAIMeter("chat", body, context_tokens=4096)
    assert should_include_usage(body.stream_options, False) == (True, True)  # the engine's
    assert (meter.wants_usage, meter.wants_every_chunk) == (False, False)  # the caller's
    assert meter.reserve["output"] == 1 and meter.reserve["input"] >= 2000
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    metering.OpenAIMeter("chat", plain, context_tokens=4096)
    assert plain.stream_options is None  # a request that does not stream is left as it is


def test_the_usage_the_caller_did_not_ask_for_is_taken_out_and_the_prompt_counted() -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "stream": True}
    meter = metering.OpenAIMeter("chat", body, context_tokens=4096)
    sent = "".join(meter.stream(p) for p in engine_stream(2004, ["Hi"])) + meter.end()
    assert [e if isinstance(e, str) else e.get("usage") for e in events(sent)] == [
        None,
        "data: [DONE]",
    ]
    assert events(sent)[0]["choices"][0]["delta"] == {"content": "Hi"}
    assert meter.used() == {"input": 2004, "output": 1}

    asked = {**body, "stream_options": {"include_usage": True}}
    meter = metering.OpenAIMeter("chat", asked, context_tokens=4096)
    sent = "".join(meter.stream(p) for p in engine_stream(2004, ["Hi", "!"]))
    usages = [e.get("usage") for e in events(sent) if isinstance(e, dict)]
    assert usages == [
        None,
        None,
        {"prompt_tokens": 2004, "completion_tokens": 2, "total_tokens": 2006},
    ]

    every = {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    meter = metering.OpenAIMeter("chat", every, context_tokens=4096)
    pieces = engine_stream(2004, ["Hi", "!"])
    assert "".join(meter.stream(p) for p in pieces) == "".join(pieces)  # as the engine sent


def test_a_stream_left_early_counts_what_came_and_an_event_split_across_pieces() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    meter = metering.OpenAIMeter("chat", body, context_tokens=4096)
    first, second, *_ = engine_stream(30, ["a", "b", "c", "d"])
    assert meter.stream(first + second[:10]) == first.replace(
        ',"usage":{"prompt_tokens":30,"completion_tokens":1,"total_tokens":31}', ""
    )
    meter.stream(second[10:])
    assert meter.used() == {"input": 30, "output": 2}  # the caller left here


def test_each_choices_output_counts_when_a_stream_has_several() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "max_tokens": 5,
        "stream": True,
    }
    meter = metering.OpenAIMeter("chat", body, context_tokens=4096)
    assert meter.reserve["output"] == 10
    for piece in [chunk("a", (9, 1), 0), chunk("b", (9, 1), 1), chunk("c", (9, 2), 0)]:
        meter.stream(piece)
    assert meter.used() == {"input": 9, "output": 3}


def test_a_request_without_max_tokens_reserves_what_the_context_leaves() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}]}
    meter = metering.OpenAIMeter("chat", body, context_tokens=2048)
    assert meter.reserve["input"] >= 100
    assert meter.reserve["input"] + meter.reserve["output"] == 2048


def test_every_route_that_runs_the_model_is_metered_and_transcriptions_refused() -> None:
    assert set(METERED) == {"chat", "completions", "embeddings", "score", "tokenize", "detokenize"}
    assert UNMETERED == ("transcriptions",)


# -- the routes, over ASGI -------------------------------------------------------------


def client(app: FastAPI, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://llm",
        headers={"authorization": f"Bearer {key}"},
    )


async def test_a_v1_stream_without_include_usage_is_charged_its_prompt(
    guard: Guard, store: KeyStore
) -> None:
    """A 2,000-token prompt with max_tokens 1, streamed, usage not asked for: charged
    its prompt and its token (it was charged about two tokens, a token a chunk)."""
    received: list[dict[str, Any]] = []

    async def chat(body: dict, request: Request) -> StreamingResponse:
        received.append(json.loads(json.dumps(body)))
        options = body.get("stream_options") or {}
        usage_every_chunk = options.get("include_usage") and options.get("continuous_usage_stats")
        pieces = engine_stream(2004, ["Hi"])
        if not usage_every_chunk:  # what the engine sends when not asked
            pieces = [chunk("Hi", None), "data: [DONE]\n\n"]

        async def stream() -> AsyncIterator[str]:
            for piece in pieces:
                yield piece

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = FastAPI()
    app.post("/v1/chat/completions")(
        guard_endpoint(chat, "llm", llm=True, meter=metering.meter("chat", lambda: 4096))
    )
    key = store.create("streamer", ["llm"], tokens_per_min=100_000)
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "stream": True}
    async with client(app, key) as c:
        answer = await c.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200 and '"usage"' not in answer.text
    assert received[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    charged = [t for name, status, t in guard.usage.seen if name == "streamer" and status == 200]
    assert charged == [{"input": 2004, "output": 1}]
    assert guard.limiter.balance("streamer", 100_000) == 100_000 - 2005


async def test_embeddings_score_and_tokenize_are_charged_and_transcriptions_refused(
    guard: Guard, store: KeyStore
) -> None:
    async def embeddings(body: dict, request: Request) -> JSONResponse:
        return JSONResponse({"data": [], "usage": {"prompt_tokens": 12, "total_tokens": 12}})

    async def tokenize(body: dict, request: Request) -> JSONResponse:
        return JSONResponse({"count": 7, "tokens": list(range(7)), "max_model_len": 2048})

    async def detokenize(body: dict, request: Request) -> JSONResponse:
        return JSONResponse({"prompt": "text"})

    async def transcriptions(body: dict, request: Request) -> JSONResponse:
        return JSONResponse({"text": "..."})

    app = FastAPI()
    for route, endpoint in [
        ("embeddings", embeddings),
        ("tokenize", tokenize),
        ("detokenize", detokenize),
    ]:
        app.post(f"/{route}")(
            guard_endpoint(endpoint, "llm", llm=True, meter=metering.meter(route, lambda: 2048))
        )
    app.post("/transcriptions")(guard_endpoint(transcriptions, "llm", refuse_token_limited=True))
    key = store.create("encoder", ["llm"], tokens_per_min=100_000)
    async with client(app, key) as c:
        assert (await c.post("/embeddings", json={"input": "a b c"})).status_code == 200
        assert (await c.post("/tokenize", json={"prompt": "a b c"})).status_code == 200
        assert (await c.post("/detokenize", json={"tokens": [1, 2, 3]})).status_code == 200
        refused = await c.post("/transcriptions", json={})
    assert refused.status_code == 403 and "token limit" in refused.text
    charged = [t for name, status, t in guard.usage.seen if name == "encoder" and status == 200]
    assert charged == [
        {"input": 12, "output": 0},
        {"input": 7, "output": 0},
        {"input": 3, "output": 0},  # three token ids
    ]
    async with client(app, store.create("unlimited", ["llm"])) as c:
        assert (await c.post("/transcriptions", json={})).status_code == 200


async def test_a_call_that_fails_is_charged_nothing_if_refused_else_its_reservation(
    guard: Guard, store: KeyStore
) -> None:
    from fastapi import HTTPException

    async def refused(body: dict, request: Request) -> JSONResponse:
        raise HTTPException(400, "the prompt is too long")

    async def broken(body: dict, request: Request) -> JSONResponse:
        raise RuntimeError("the engine died mid-way")

    app = FastAPI()
    app.post("/refused")(
        guard_endpoint(refused, "llm", llm=True, meter=metering.meter("chat", lambda: 2048))
    )
    app.post("/broken")(
        guard_endpoint(broken, "llm", llm=True, meter=metering.meter("chat", lambda: 2048))
    )
    key = store.create("failing", ["llm"], tokens_per_min=100_000)
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}
    async with client(app, key) as c:
        assert (await c.post("/refused", json=body)).status_code == 400
        with pytest.raises(RuntimeError):
            await c.post("/broken", json=body)
    charged = [(s, t) for name, s, t in guard.usage.seen if name == "failing"]
    # Reserved: the prompt's 44 characters (its role's included) and max_tokens.
    assert charged == [(400, {}), (500, {"input": 11, "output": 8})]
    assert guard.limiter.balance("failing", 100_000) == 100_000 - 19


# -- LLMClient, a pipeline's calls ----------------------------------------------------


class EngineCall:
    """A streaming handle call to the engine: its items, then a wait (with `hang`)."""

    def __init__(self, items: list[Any], hang: bool) -> None:
        self.items = items
        self.hang = hang
        self.cancelled = False

    def __aiter__(self) -> EngineCall:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        if self.items:
            return self.items.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """The engine deployment's handle, as `LLMClient` uses it."""

    def __init__(self, items: list[Any], hang: bool = False) -> None:
        self.items, self.hang = items, hang
        self.requests: list[Any] = []
        self.calls: list[EngineCall] = []
        self.chat = self

    def options(self, **_: Any) -> Handle:
        return self

    def remote(self, request: Any, *args: Any) -> EngineCall:
        self.requests.append(request)
        self.calls.append(EngineCall(list(self.items), self.hang))
        return self.calls[-1]


def batches(prompt_tokens: int, words: list[str]) -> list[Any]:
    """What the engine deployment yields for a pipeline's call: lists of SSE lines (one
    a list here), then the call's charge."""
    pieces = engine_stream(prompt_tokens, words)
    lines = [[event] for piece in pieces for event in piece.split("\n\n") if event]
    return [*lines, {CHARGE_ITEM: {"cpu_s": 0.1}}]


REQUEST = ChatRequest(messages=[Message(role="user", content="hi")], max_tokens=8)


async def test_a_pipeline_call_reports_its_tokens_as_they_arrive_and_when_cut_short() -> None:
    handle = Handle(batches(40, ["a", "b", "c"])[:2], hang=True)  # two words, then a wait
    client = LLMClient(handle, model_id="m")
    incurred = Incurred()

    async def call() -> ChatResponse:
        with counting(incurred):
            return await client.chat(REQUEST)

    task = asyncio.ensure_future(call())
    while incurred.output < 2:
        await asyncio.sleep(0)
    task.cancel()  # a deadline, or the caller gone
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (incurred.input, incurred.output) == (40, 2)
    deadline = time.monotonic() + 10
    while not handle.calls[0].cancelled:  # the generation is aborted (from a thread)
        assert time.monotonic() < deadline, "the engine call was not cancelled"
        await asyncio.sleep(0.01)
    options = handle.requests[0].stream_options
    assert options.include_usage and options.continuous_usage_stats  # counted: streamed


async def test_a_pipeline_call_that_ends_reports_the_engines_count() -> None:
    handle = Handle(batches(40, ["a", "b", "c"]))
    incurred = Incurred()
    with counting(incurred):
        reply = await LLMClient(handle, model_id="m").chat(REQUEST)
    assert reply.text == "abc" and reply.usage.input_tokens == 40
    assert (incurred.input, incurred.output) == (40, 3)
