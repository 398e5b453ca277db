from __future__ import annotations

from servegraph import InProcessRuntime, Pipeline, from_yaml, to_yaml, validate
from tests.servegraph import toy


def test_yaml_round_trip_is_equal_for_every_node_kind() -> None:
    p = Pipeline("all_kinds", input=toy.Counter, output=toy.Counter)
    looped = p.loop(
        "loop",
        toy.counter_body(),
        until=toy.reached_three,
        max_iterations=4,
        value=p.input.value,
        timeout_s=2.0,
    )
    p.returns(looped)
    for graph in (toy.rag().build(), toy.routed().build(), p.build()):
        text = to_yaml(graph)
        assert from_yaml(text) == graph
        validate(from_yaml(text), toy.CATALOG)


def test_yaml_refers_to_python_by_import_path() -> None:
    text = to_yaml(toy.rag().build())
    assert "input: tests.servegraph.toy:Question" in text
    assert "function: tests.servegraph.toy:make_answer" in text


async def test_graph_written_in_yaml_runs_like_the_python_one() -> None:
    text = """
name: rag_yaml
input: tests.servegraph.toy:Question
output: tests.servegraph.toy:Answer
nodes:
  - {kind: call, name: embed, server: embedder, method: embed, inputs: {text: input.question}}
  - {kind: call, name: retrieve, server: index, method: search,
     inputs: {vector: embed.vector, k: input.k}}
  - kind: function
    name: answer
    function: tests.servegraph.toy:make_answer
    inputs: {question: input.question, hits: retrieve.hits}
returns: answer
"""
    runtime = InProcessRuntime(toy.CATALOG, toy.servers())
    from_python = await runtime.run(toy.rag().build(), {"question": "q"})
    assert await runtime.run(from_yaml(text), {"question": "q"}) == from_python
