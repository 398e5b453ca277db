"""LLM token usage is reported for the calls whose contract declares where it is
(`MethodContract(usage=...)`), not guessed from the response's shape."""

from __future__ import annotations

from pydantic import BaseModel

from servegraph import Catalog, InProcessRuntime, MethodContract, Pipeline, ServerSpec
from servegraph.engine.runtime import NodeRecord


class Prompt(BaseModel):
    text: str


class Tokens(BaseModel):
    input_tokens: int
    output_tokens: int


class Reply(BaseModel):
    text: str
    usage: Tokens


class Model:
    async def generate(self, request: Prompt) -> Reply:
        return Reply(text=request.text.upper(), usage=Tokens(input_tokens=3, output_tokens=5))


def catalog(usage: str | None) -> Catalog:
    contract = MethodContract(Prompt, Reply, usage=usage)
    return Catalog([ServerSpec("model", {"generate": contract}, "x:y", "M", "/m")])


def graph() -> Pipeline:
    p = Pipeline("shout", input=Prompt, output=Reply)
    p.returns(p.call("generate", "model", "generate", text=p.input.text))
    return p


async def records_of(usage: str | None) -> list[NodeRecord]:
    records: list[NodeRecord] = []
    runtime = InProcessRuntime(catalog(usage), {"model": Model()})
    await runtime.execute(graph().build(), {"text": "hi"}, records=records)
    return records


async def test_a_declared_usage_field_is_reported() -> None:
    (record,) = await records_of("usage")
    assert record.usage == {"input": 3, "output": 5}


async def test_an_undeclared_one_is_not() -> None:
    (record,) = await records_of(None)
    assert record.usage is None
