"""Every method the catalog advertises exists, with the contract's request and response
types, on the class that serves it on Ray Serve and on its in-process twin
(`deployments.in_process`, what `InProcessRuntime` and the benchmarks' raw baseline use): a twin
that drifts fails here, not in an integration run."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator

import pytest

from deployments import in_process
from deployments.catalog import CATALOG
from servegraph.catalog import MethodContract
from servegraph.graph import resolve

TWINS = {
    "llm": in_process.LocalLLM,
    "embedder": in_process.LocalEmbedder,
    "classifier": in_process.LocalClassifier,
    "vector_index": in_process.LocalIndex,
}


# Where each server's calls land on Serve. The catalog names the application builder and
# the deployment's name, not its class: issue 12 gives each server one home that does.
SERVED = {
    "llm": "deployments.llm:LLMClient",  # wraps the ray.serve.llm deployment's handle
    "embedder": "deployments.embedder:Embedder",
    "classifier": "deployments.classifier:Classifier",
    "vector_index": "deployments.vector_index:VectorIndex",
}


def served_class(server: str) -> type:
    target = resolve(SERVED[server])
    cls = getattr(target, "func_or_class", target)  # a @serve.deployment wraps its class
    spec = CATALOG[server]
    assert spec.client == SERVED[server] or target.name == spec.deployment, spec
    return cls


def check(cls: type, name: str, contract: MethodContract) -> None:
    method = getattr(cls, name, None)
    assert method is not None, f"{cls.__qualname__} has no {name}()"
    hints = typing.get_type_hints(typing.cast(typing.Callable, method))
    request = [v for k, v in hints.items() if k != "return"]
    assert request == [contract.request], f"{cls.__qualname__}.{name} takes {request}"
    if contract.stream_method and name == contract.stream_method:
        assert typing.get_origin(hints["return"]) is AsyncIterator, hints["return"]
    else:
        assert hints["return"] is contract.response, f"{cls.__qualname__}.{name} returns {hints}"


@pytest.mark.parametrize("server", list(CATALOG))
@pytest.mark.parametrize("where", ["serve", "in-process"])
def test_every_advertised_method_is_there_with_the_contracts_types(server: str, where: str) -> None:
    cls = served_class(server) if where == "serve" else TWINS[server]
    for name, contract in CATALOG[server].methods.items():
        check(cls, name, contract)
        if contract.stream_method:
            check(cls, contract.stream_method, contract)


def test_every_server_has_a_serve_class_and_an_in_process_twin() -> None:
    assert set(TWINS) == set(CATALOG) == set(SERVED)
