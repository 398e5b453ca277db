"""Per-key LLM token limits on the real platform (issue 24, finding 2): a caller who
leaves a rag stream after its last chunk is charged what the engine generated, a /v1
stream that did not ask for usage is charged its prompt, and twenty requests at once on
a key with one answer left overspend by one request's reservation at most."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from servegraph.security.keys import AuthSettings, KeyStore

pytestmark = pytest.mark.integration
QUESTION = {"question": "How long do refunds take after a return?"}
MODEL = "smollm2-135m-instruct"


def store() -> KeyStore:
    return KeyStore(AuthSettings().store_path)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def key_tokens(pipelines: LocalCluster, key: str) -> dict[str, float]:
    """The LLM tokens charged to `key`'s name so far, by direction, every replica's
    series summed (`ray_servegraph_key_llm_tokens`)."""
    totals = {"input": 0.0, "output": 0.0}
    for line in httpx.get(pipelines.metrics_url, timeout=10).text.splitlines():
        if (
            line.startswith("#")
            or "servegraph_key_llm_tokens" not in line
            or "_created" in line
            or f'key="{key}"' not in line
        ):
            continue
        direction = re.search(r'direction="(\w+)"', line)
        if direction and direction.group(1) in totals:
            totals[direction.group(1)] += float(line.rsplit(" ", 1)[1])
    return totals


def wait_for(read: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = 120) -> Any:
    """`read()`'s value once `done` holds of it (Ray exports metrics on its own
    interval), or the last one read when `timeout_s` ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(1)


def stream_events(response: httpx.Response) -> Any:
    """(event, data) for each server-sent event of a streamed response, as it arrives."""
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            yield name, json.loads(line.removeprefix("data:").strip())
            name = "message"


def test_a_rag_stream_left_after_its_last_chunk_is_charged_the_engines_tokens(
    pipelines: LocalCluster,
) -> None:
    with httpx.Client(base_url=pipelines.base_url, timeout=180, headers=client_headers()) as c:
        # The same question, read to its end: the engine's counts (greedy decoding: the
        # same reply), and the answer's text as its chunks carry it.
        with c.stream("POST", "/pipelines/rag/stream", json=QUESTION) as whole:
            assert whole.status_code == 200
            events = list(stream_events(whole))
        answer = "".join(d["text"] for name, d in events if name == "chunk")
        usage = next(d for name, d in events if name == "usage")
        engine = usage["llm_input_tokens"] + usage["llm_output_tokens"]
        assert answer and engine > 0, events

    key = store().create("it-leaver", ["invoke:rag"], tokens_per_min=1_000_000)
    with httpx.Client(base_url=pipelines.base_url, timeout=180, headers=bearer(key)) as c:
        with c.stream("POST", "/pipelines/rag/stream", json=QUESTION) as left:
            assert left.status_code == 200
            read, seen = "", []
            for name, data in stream_events(left):
                seen.append(name)
                if name == "chunk":
                    read += data["text"]
                # Hang up on the answer's last chunk: the LLM is still writing the
                # reply's end (its sources); or, if the reply differed, on the first
                # event after the chunks.
                if len(read) >= len(answer) or (read and name != "chunk"):
                    break
        assert "result" not in seen and "usage" not in seen, seen

    charged = wait_for(
        lambda: key_tokens(pipelines, "it-leaver"),
        lambda t: t["input"] + t["output"] >= 0.9 * engine,
    )
    print(f"\nengine {usage}, charged after hanging up {charged}")
    assert charged["input"] + charged["output"] == pytest.approx(engine, rel=0.10), charged
    assert charged["input"] == pytest.approx(usage["llm_input_tokens"], rel=0.10), charged


def test_a_v1_stream_without_include_usage_is_charged_its_prompt(
    pipelines: LocalCluster,
) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 120  # about 1,300 tokens
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    admin = openai.OpenAI(
        base_url=f"{pipelines.base_url}/v1",
        api_key=client_headers()["authorization"].split()[-1],
        max_retries=0,
    )
    prompt_tokens = admin.chat.completions.create(**chat).usage.prompt_tokens  # type: ignore[union-attr]
    assert prompt_tokens > 1000

    key = store().create("it-v1-stream", ["llm"], tokens_per_min=1_000_000)
    client = openai.OpenAI(base_url=f"{pipelines.base_url}/v1", api_key=key, max_retries=0)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks and all(c.usage is None for c in chunks)  # as if usage was never asked
    charged = wait_for(
        lambda: key_tokens(pipelines, "it-v1-stream"),
        lambda t: t["input"] >= 0.9 * prompt_tokens,
    )
    assert charged["input"] == pytest.approx(prompt_tokens, rel=0.10), charged
    assert 1 <= charged["output"] <= 2, charged


def test_twenty_requests_at_once_on_a_key_with_one_answer_left_overspend_one_reservation(
    pipelines: LocalCluster,
) -> None:
    import ray

    from servegraph.security.limits import ACTOR_NAME, ACTOR_NAMESPACE

    per_min = 120  # refills 2 tokens a second: little during the burst
    key = store().create("it-crowd", ["llm"], tokens_per_min=per_min)
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
        "max_tokens": 16,
    }
    with httpx.Client(base_url=pipelines.base_url, timeout=180, headers=bearer(key)) as c:
        first = c.post("/v1/chat/completions", json=chat)  # teaches the ingress the prompt
        assert first.status_code == 200, first.text
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    reservation = prompt_tokens + chat["max_tokens"]  # the most one answer may use

    limiter = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
    balance = ray.get(limiter.balance.remote("it-crowd", per_min))
    left = reservation + 5  # one answer, and a little
    ray.get(limiter.spend.remote("it-crowd", int(balance - left), per_min))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=pipelines.base_url, timeout=180, headers=bearer(key)
        ) as client:
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=chat) for _ in range(20))
            )

    started = time.monotonic()
    answers = asyncio.run(burst())
    refilled = (time.monotonic() - started) * per_min / 60
    statuses = [a.status_code for a in answers]
    spent = sum(a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200)
    print(f"\nstatuses {statuses}; {spent} tokens spent of {left} left (+{refilled:.0f})")
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 15, statuses
    assert spent <= left + refilled + reservation, (spent, left, refilled, reservation)
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
