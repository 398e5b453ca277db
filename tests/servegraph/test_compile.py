"""The compile step: a graph is validated and bound once, then runs without validation
or imports on the way (the ingress and gateways compile at start; a plain Graph given
to `run` is compiled on each call)."""

from __future__ import annotations

import pytest

from servegraph import CompiledGraph, GraphValidationError, InProcessRuntime, Pipeline, compile
from tests.servegraph import toy


def test_compile_reports_every_problem_at_once() -> None:
    p = Pipeline("broken", input=toy.Text, output=str)
    p.call("a", "nope", "x", text=p.input.text)
    p.returns(p.function("b", toy.shout, text=p.input.missing))
    with pytest.raises(GraphValidationError) as error:
        compile(p.build(), toy.CATALOG)
    assert len(error.value.problems) >= 2


def test_a_compiled_graph_binds_every_import_and_sub_graph() -> None:
    compiled = compile(toy.routed().build(), toy.CATALOG)
    assert isinstance(compiled, CompiledGraph) and compiled.input is toy.Text
    route = next(n for n in compiled.graph.nodes if n.name == "route")
    billing = compiled.sub(route.cases["billing"])
    assert billing.functions["transform"] is toy.shout
    assert compiled.waits_on["route"] == {"classify"}


async def test_a_compiled_graph_runs_with_no_validation_or_import(monkeypatch) -> None:
    compiled = compile(toy.routed().build(), toy.CATALOG)

    def forbidden(*args, **kwargs):
        raise AssertionError("validated or imported while running a compiled graph")

    monkeypatch.setattr("servegraph.lang.compiled.validate", forbidden)
    monkeypatch.setattr("servegraph.lang.compiled.resolve", forbidden)
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    for _ in range(3):
        assert await runtime.run(compiled, {"text": "my invoice"}) == "MY INVOICE"
        assert await runtime.run(compiled, {"text": "It Crashes"}) == "it crashes"
