"""The triage agent's wiring, in-process with scripted model servers (no Ray): the loop
refuses repeats, uses the ticket's keys, ends when the evidence is in, and drafts the
reply from the tool results (or states them when the draft misses them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.catalog import CATALOG
from deployments.classifier.contract import Classification
from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.llm.contract import ChatResponse, Usage
from deployments.vector_index.contract import Hit, SearchResponse
from pipelines.agent.triage import build_pipeline
from servegraph import InProcessRuntime, validate


class ScriptedLLM:
    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests = []

    async def chat(self, request):
        self.requests.append(request)
        return ChatResponse(
            text=self.replies.pop(0),
            finish_reason="stop",
            usage=Usage(input_tokens=10, output_tokens=5),
            model="scripted",
        )


class FixedClassifier:
    def __init__(self, label: str) -> None:
        self.label = label

    async def classify(self, request):
        return Classification(label=self.label, score=0.9, scores={self.label: 0.9})


ARTICLE = (
    "If a device will not connect to wifi, hold the power button for 10 seconds to reset "
    "its network settings. Devices only support 2.4 GHz networks."
)


class OneArticle:
    """Embedder and index in one: every text embeds to the same vector, so every
    sentence of the one article is equally close; records what was searched."""

    def __init__(self) -> None:
        self.embedded: list[str] = []

    async def embed_one(self, request):
        self.embedded.append(request.text)
        return Embedding(vector=np.ones(4, dtype=np.float32) / 2, dim=4)

    async def embed(self, request):
        return EmbedResponse(
            vectors=np.full((len(request.texts), 4), 0.5, dtype=np.float32), dim=4, model="f"
        )

    async def search(self, request):
        hit = Hit(id="kb/wifi#0", text=ARTICLE, score=0.9, metadata={"title": "Wifi"})
        return SearchResponse(hits=[hit])


def call(tool: str, argument: str = "") -> str:
    return json.dumps({"tool": tool, "argument": argument})


def draft(text: str) -> str:
    return json.dumps({"reply": text})


@pytest.fixture(autouse=True)
def _agent_db(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))  # the real records, built here


def runtime(label: str, llm: ScriptedLLM) -> InProcessRuntime:
    from deployments.records.model import SupportRecords

    kb = OneArticle()
    servers = {
        "classifier": FixedClassifier(label),
        "llm": llm,
        "embedder": kb,
        "vector_index": kb,
        "records": SupportRecords(),
    }
    return InProcessRuntime(CATALOG, servers)


def test_agent_graph_is_valid() -> None:
    validate(build_pipeline().build(), CATALOG)


async def test_invalid_call_is_fed_back_then_the_tickets_order_then_a_checked_draft() -> None:
    llm = ScriptedLLM(
        [
            "{not json",
            call("lookup_order", "99999"),  # the ticket holds 12345: that is what is looked up
            call("final_answer"),
            draft("Your Nimbus headphones are in transit with DHL. Thank you!"),
        ]
    )
    result = await runtime("shipping", llm).run(
        build_pipeline().build(), {"text": "Where is my order 12345?", "email": "ANA@example.com"}
    )
    assert result.team == "shipping" and result.completed
    assert [s.tool for s in result.steps] == ["invalid", "lookup_order", "final_answer"]
    assert not result.steps[0].valid and "not a valid tool call" in result.steps[0].output
    assert result.steps[1].input == "12345" and "in transit" in result.steps[1].output
    assert result.drafted == "llm"
    assert result.reply == "Your Nimbus headphones are in transit with DHL."  # no filler
    # The invalid call was shown to the model on the next step; step one offered only
    # the look-up the ticket holds the key for.
    assert "not a valid tool call" in llm.requests[1].messages[1].content
    assert llm.requests[0].json_schema["properties"]["tool"]["enum"] == ["lookup_order"]
    # The draft saw the ticket and the order's facts as a sentence.
    assert "Order 12345 (Nimbus headphones) is in transit" in llm.requests[-1].messages[-1].content


async def test_a_used_tool_is_not_offered_again_and_a_repeat_is_refused() -> None:
    llm = ScriptedLLM([call("lookup_order", "12345")] * 4 + [draft("")])
    result = await runtime("shipping", llm).run(
        build_pipeline().build(), {"text": "Order 12345 has not arrived"}
    )
    assert [s.tool for s in result.steps] == ["lookup_order", "invalid", "invalid", "invalid"]
    assert "used or unavailable tool 'lookup_order'" in result.steps[1].output
    assert llm.requests[1].json_schema["properties"]["tool"]["enum"] == [
        "search_kb",
        "final_answer",
    ]
    assert not result.completed  # out of steps
    # The empty draft is replaced by the facts found.
    assert result.drafted == "facts" and "in transit" in result.reply


async def test_the_loop_ends_when_every_tool_that_applies_was_used() -> None:
    """No order number, no email: only search_kb applies, once; a poor query (no word of
    the ticket) is replaced by the ticket's own words."""
    ticket = "My watch will not connect to the wifi at home"
    llm = ScriptedLLM([call("search_kb", "xyz"), draft("I cannot help.")])
    rt = runtime("technical", llm)
    result = await rt.run(build_pipeline().build(), {"text": ticket})
    assert result.completed and [s.tool for s in result.steps] == ["search_kb"]
    assert result.steps[0].input == ticket
    assert rt.servers["embedder"].embedded == [ticket]
    assert len(llm.requests) == 2  # one choice, one draft
    # "I cannot help." states nothing the article says: the reply states the article.
    assert result.drafted == "facts"
    assert "10 seconds" in result.reply and "2.4 GHz" in result.reply


async def test_a_draft_that_invents_a_number_is_cut_to_what_the_facts_support() -> None:
    llm = ScriptedLLM(
        [
            call("search_kb", "wifi connect"),
            draft(
                "Hold the power button for 10 seconds to reset the network settings. "
                "Devices only support 2.4 GHz networks. Call us at 555-0100."
            ),
        ]
    )
    result = await runtime("technical", llm).run(
        build_pipeline().build(), {"text": "My watch will not connect to wifi"}
    )
    assert result.drafted == "llm"
    assert "10 seconds" in result.reply and "555" not in result.reply
