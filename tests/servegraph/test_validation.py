from __future__ import annotations

import pytest

from servegraph import GraphValidationError, Pipeline, Ref, validate
from servegraph.lang.graph import CallNode, FunctionNode
from tests.servegraph import toy


def problems_of(pipeline: Pipeline) -> list[str]:
    with pytest.raises(GraphValidationError) as info:
        validate(pipeline.build(), toy.CATALOG)
    return [str(p) for p in info.value.problems]


def test_valid_graphs_pass() -> None:
    for build in (toy.rag, toy.routed):
        assert validate(build().build(), toy.CATALOG)


def test_unknown_server_method_node_and_function_are_reported_together() -> None:
    p = Pipeline("bad", input=toy.Question, output=toy.Answer)
    a = p.call("a", "nope", "embed", text=p.input.question)
    b = p.call("b", "embedder", "nope", text=a.text)
    c = p.function("c", "tests.servegraph.toy:missing", x=b)
    p.returns(p.function("d", toy.make_answer, question=c, hits=p.input.ghost))
    found = problems_of(p)
    assert any("[a] unknown model server 'nope'" in s and "embedder" in s for s in found)
    assert any("[b] model server 'embedder' has no method 'nope'" in s for s in found)
    assert any("[c] cannot import function" in s for s in found)
    assert any("[d.hits]" in s and "no field 'ghost'" in s for s in found)


def test_ref_to_unknown_node_names_known_ones() -> None:
    p = Pipeline("bad", input=toy.Question, output=toy.Answer)
    p.returns(
        p.function("answer", toy.make_answer, question=p.input.question, hits=Ref("ghost").hits)
    )
    found = problems_of(p)
    assert any("[answer.hits] ref 'ghost.hits' names unknown node 'ghost'" in s for s in found)


def test_type_mismatch_names_node_port_and_types() -> None:
    p = Pipeline("bad", input=toy.Question, output=toy.Answer)
    emb = p.call("embed", "embedder", "embed", text=p.input.k)  # int into str
    hits = p.call("retrieve", "index", "search", vector=emb.vector)
    p.returns(p.function("answer", toy.make_answer, question=p.input.question, hits=hits.hits))
    (problem,) = problems_of(p)
    assert problem.startswith("[embed.text] type mismatch: 'input.k' is int, port expects str")


def test_bad_constant_and_unknown_port_and_missing_input() -> None:
    p = Pipeline("bad", input=toy.Question, output=toy.Answer)
    emb = p.call("embed", "embedder", "embed", txt=p.input.question)
    hits = p.call("retrieve", "index", "search", vector=emb.vector, k="many")
    p.returns(p.function("answer", toy.make_answer, question=p.input.question, hits=hits.hits))
    found = problems_of(p)
    assert any("[embed.txt] no such input port -> fix: use one of ['text']" in s for s in found)
    assert any("[embed.text] required input of type str is not connected" in s for s in found)
    assert any("[retrieve.k] constant 'many' is not a valid int" in s for s in found)


def test_cycle_outside_a_loop_is_rejected() -> None:
    graph = toy.rag().build()
    graph.nodes[0].inputs["text"] = "answer.answer"  # embed <- answer <- retrieve <- embed
    with pytest.raises(GraphValidationError) as info:
        validate(graph, toy.CATALOG)
    assert any("cycle:" in str(p) and "loop node" in p.fix for p in info.value.problems)


def test_unreachable_node_and_duplicate_names() -> None:
    graph = toy.rag().build()
    graph.nodes.append(
        CallNode(name="stray", server="embedder", method="embed", inputs={"text": "input.question"})
    )
    graph.nodes.append(
        FunctionNode(
            name="embed", function="tests.servegraph.toy:shout", inputs={"text": "input.question"}
        )
    )
    with pytest.raises(GraphValidationError) as info:
        validate(graph, toy.CATALOG)
    text = str(info.value)
    assert "[stray] node does not contribute to the output (unreachable)" in text
    assert "[embed] duplicate node name" in text


def test_returns_checked_against_output_model() -> None:
    p = Pipeline("bad", input=toy.Question, output=toy.Answer)
    emb = p.call("embed", "embedder", "embed", text=p.input.question)
    p.returns(answer=emb.vector, extra=p.input.question)
    found = problems_of(p)
    assert any("[returns.answer] type mismatch" in s for s in found)
    assert any("[returns.extra] output Answer has no field 'extra'" in s for s in found)
    assert any("[returns.sources] required output field is not set" in s for s in found)


def test_retries_need_idempotent_and_switch_branches_must_agree() -> None:
    p = Pipeline("bad", input=toy.Text, output=str)
    label = p.call("classify", "classifier", "classify", text=p.input.text, retries=2)
    length_case = Pipeline("len", input=toy.Text, output=int)
    length_case.returns(length_case.function("n", toy.length, text=length_case.input.text))
    p.returns(
        p.switch(
            "route",
            on=label.label,
            cases={"billing": toy.case(toy.shout), "technical": length_case},
            text=p.input.text,
        )
    )
    found = problems_of(p)
    assert any("[classify] retries=2 on a node not declared idempotent" in s for s in found)
    assert any("[route] branches return different types" in s for s in found)


def test_subgraph_problems_are_prefixed_with_their_path() -> None:
    body = Pipeline("body", input=toy.Counter, output=toy.Counter)
    body.returns(
        body.function("inc", toy.increment, value=body.input.nope, history=body.input.history)
    )
    p = Pipeline("outer", input=toy.Counter, output=toy.Counter)
    p.returns(p.loop("count", body, until=toy.reached_three, max_iterations=5, value=p.input.value))
    found = problems_of(p)
    assert any(s.startswith("[count/body/inc.value]") for s in found)


def test_every_problem_is_reported_at_once() -> None:
    p = Pipeline("bad", input=toy.Question, output=toy.Answer)
    p.call("a", "nope", "x")
    p.call("a", "embedder", "embed", text=p.input.k)
    assert len(problems_of(p)) >= 4  # unknown server, duplicate, mismatch, returns, unreachable
