"""Typed pipeline calls (`servegraph.lang.calls`): a server's methods declared once, on a
`Server` subclass its catalog entry takes its contracts from; a typed call builds the
very node the string form builds. (That mypy rejects a misspelt field is shown in
`tests/test_static_checks.py`.)"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from deployments.catalog import CATALOG
from deployments.embedder import EmbedderMethods, embedder
from deployments.embedder.contract import Embedding, EmbedOneRequest
from deployments.records import records
from deployments.vector_index import vector_index
from deployments.vector_index.contract import Hit
from servegraph import Method, Pipeline, Ref, Server, ServerSpec, check, to_yaml


class Question(BaseModel):
    question: str
    k: int = 3


class Found(BaseModel):
    hits: list[Hit]


def _string_pipeline() -> Pipeline:
    p = Pipeline("find", input=Question, output=Found)
    query = p.call("embed", "embedder", "embed_one", text=p.input.question)
    found = p.call(
        "retrieve",
        "vector_index",
        "search",
        vector=query.vector,
        k=p.input.k,
        filter={"source": "kb"},
        idempotent=True,
        retries=1,
        timeout_s=2.0,
    )
    p.returns(hits=found.hits)
    return p


def _typed_pipeline() -> Pipeline:
    p = Pipeline("find", input=Question, output=Found)
    query = p.call("embed", embedder.embed_one(text=p.input.question))
    found = p.call(
        "retrieve",
        vector_index.search(vector=query.vector, k=p.input.k, filter={"source": "kb"}),
        idempotent=True,
        retries=1,
        timeout_s=2.0,
    )
    p.returns(hits=found.hits)
    return p


def test_a_typed_call_builds_the_node_the_string_form_builds() -> None:
    typed, strings = _typed_pipeline().build(), _string_pipeline().build()
    assert typed == strings
    assert to_yaml(typed) == to_yaml(strings)
    assert check(typed, CATALOG) == []


def test_a_typed_calls_output_is_a_reference_to_the_node() -> None:
    p = Pipeline("find", input=Question, output=Found)
    query = p.call("embed", embedder.embed_one(text=p.input.question))
    assert isinstance(query, Ref)
    assert query.vector.path == "embed.vector"


def test_every_catalog_server_takes_its_contracts_from_its_typed_methods() -> None:
    assert CATALOG["embedder"].methods == EmbedderMethods.contracts()
    assert embedder.embed_one.contract.request is EmbedOneRequest
    assert embedder.embed_one.contract.response is Embedding
    assert records.lookup_order.server == "records"
    assert records.lookup_order.name == "lookup_order"


def test_a_typed_method_names_a_fallback() -> None:
    p = Pipeline("find", input=Question, output=Found)
    p.call("embed", embedder.embed_one(text=p.input.question), fallback=records.lookup_order)
    (node,) = p.build().nodes
    assert node.fallback is not None
    assert (node.fallback.server, node.fallback.method) == ("records", "lookup_order")


def test_misuse_is_refused_where_it_is_written() -> None:
    p = Pipeline("find", input=Question, output=Found)
    with pytest.raises(TypeError, match="by name"):
        embedder.embed_one(p.input.question)
    with pytest.raises(TypeError, match="go in the method call"):
        p.call("embed", embedder.embed_one(), text=p.input.question)
    with pytest.raises(TypeError, match="names its method already"):
        p.call("embed", embedder.embed_one(text=p.input.question), "embed")
    with pytest.raises(TypeError, match="pydantic model class"):
        Method(dict, Embedding)
    loose = Method(EmbedOneRequest, Embedding)
    with pytest.raises(TypeError, match="through its Server subclass"):
        loose(text="x")


def test_a_new_servers_methods_make_its_catalog_entry() -> None:
    class Reply(BaseModel):
        text: str

    class EchoMethods(Server, name="echo"):
        echo = Method(Reply, Reply, idempotent=True)

    spec = ServerSpec(
        name=EchoMethods.name,
        methods=EchoMethods.contracts(),
        app_builder="x:y",
        deployment="Echo",
        route_prefix="/echo",
    )
    assert spec.methods["echo"].idempotent
    assert EchoMethods().echo(text="hi").ports == {"text": "hi"}
    assert "echo" in repr(EchoMethods())
