"""The triage agent's wiring, in-process with scripted model servers (no Ray)."""

from __future__ import annotations

import json

import pytest

from deployments.catalog import CATALOG
from deployments.schemas import ChatResponse, Classification, Usage
from pipelines.agent.triage import build_pipeline
from servegraph import LocalRuntime, validate


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


@pytest.fixture(autouse=True)
def _agent_db(tmp_path, monkeypatch):
    from pipelines.agent import tools

    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    tools.database.cache_clear()
    yield
    tools.database.cache_clear()


def test_agent_graph_is_valid() -> None:
    validate(build_pipeline().build(), CATALOG)


async def test_invalid_call_is_fed_back_then_order_tool_then_answer() -> None:
    llm = ScriptedLLM(
        [
            "{not json",
            json.dumps({"tool": "lookup_order", "argument": "12345"}),
            json.dumps({"tool": "final_answer", "argument": "Your headphones arrive Nov 26."}),
        ]
    )
    runtime = LocalRuntime(CATALOG, {"classifier": FixedClassifier("shipping"), "llm": llm})
    result = await runtime.run(
        build_pipeline().build(), {"text": "Where is my order 12345?", "email": "ANA@example.com"}
    )
    assert result.team == "shipping" and result.completed
    assert [s.tool for s in result.steps] == ["invalid", "lookup_order", "final_answer"]
    assert not result.steps[0].valid and "not a valid tool call" in result.steps[0].output
    assert "in transit" in result.steps[1].output and result.steps[1].valid
    assert result.reply == "Your headphones arrive Nov 26."
    # The invalid call was shown to the model on the next step; step one offered no answer.
    assert "not a valid tool call" in llm.requests[1].messages[1].content
    assert "final_answer" not in llm.requests[0].json_schema["properties"]["tool"]["enum"]
    assert "ana@example.com" in llm.requests[0].messages[1].content


async def test_unknown_tool_for_the_team_is_rejected_and_budget_ends_the_loop() -> None:
    call = json.dumps({"tool": "lookup_order", "argument": "12345"})
    llm = ScriptedLLM([call] * 4)
    runtime = LocalRuntime(CATALOG, {"classifier": FixedClassifier("technical"), "llm": llm})
    result = await runtime.run(build_pipeline().build(), {"text": "The app crashes on start"})
    assert result.team == "technical" and not result.completed
    assert len(result.steps) == 4 and all(not s.valid for s in result.steps)
    assert "unknown or unavailable tool 'lookup_order'" in result.steps[0].output
    assert "follow up" in result.reply
