"""A trivial model server and function for measuring the runtime's own cost per hop."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from servegraph import Catalog, MethodContract, Pipeline, ServerSpec


class Value(BaseModel):
    value: int


def bump(value: int) -> int:
    return value + 1


@serve.deployment(name="Echo", max_ongoing_requests=1000)
class Echo:
    async def bump(self, request: Value) -> Value:
        return Value(value=request.value + 1)


def echo_app(args: dict | None = None):
    return Echo.bind()


@serve.deployment(name="RawChain", max_ongoing_requests=1000)
class RawChain:
    """The reference for a call node: the same hops written directly on Serve, no
    servegraph. POST {"value": 0, "n": 3} makes n handle calls to Echo in a row."""

    def __init__(self, echo: DeploymentHandle) -> None:
        self.echo = echo

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        value = Value(value=body["value"])
        for _ in range(body["n"]):
            value = await self.echo.bump.remote(value)
        return value.model_dump()


def raw_chain_app() -> Any:
    return RawChain.bind(Echo.bind())


CATALOG = Catalog(
    [
        ServerSpec(
            "echo",
            {"bump": MethodContract(Value, Value)},
            "benchmarks.trivial:echo_app",
            "Echo",
            "/echo",
        )
    ]
)


def chain(n: int, kind: str) -> Pipeline:
    """n nodes in a row, each adding 1: `function` nodes or `call` nodes (a Serve hop)."""
    p = Pipeline(f"{kind}_chain_{n}", input=Value, output=Value if kind == "call" else int)
    ref = p.input.value
    for i in range(n):
        if kind == "call":
            ref = p.call(f"n{i}", "echo", "bump", value=ref).value
        else:
            ref = p.function(f"n{i}", bump, value=ref)
    if kind == "call":
        p.returns(p.call("last", "echo", "bump", value=ref))
    else:
        p.returns(ref)
    return p
