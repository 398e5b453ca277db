"""Every method the catalog advertises exists, with the contract's request and response
types, on the class that serves it on Ray Serve (`ServerSpec.serve_class`, or the
`client` in front of a deployment that is not ours) and on the class that serves it in
process (`ServerSpec.in_process`, what `InProcessRuntime` and the benchmarks' raw
baseline use): a server that drifts from its contract fails here, not in an
integration run."""

from __future__ import annotations

import importlib
import typing
from collections.abc import AsyncIterator

import pytest

from deployments.catalog import CATALOG
from servegraph.lang.catalog import MethodContract, ServerSpec
from servegraph.lang.graph import resolve


def served_class(spec: ServerSpec) -> type:
    assert (spec.serve_class is None) != (spec.client is None), (
        f"{spec.name}: name the Serve class, or the client in front of a deployment"
    )
    if spec.client:
        return resolve(spec.client)
    deployment = resolve(spec.serve_class)
    assert deployment.name == spec.deployment, f"{spec.serve_class} is named {deployment.name}"
    return deployment.func_or_class  # a @serve.deployment wraps its class


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
    spec = CATALOG[server]
    assert spec.in_process, f"{server}: no in-process class"
    cls = served_class(spec) if where == "serve" else resolve(spec.in_process)
    for name, contract in spec.methods.items():
        check(cls, name, contract)
        if contract.stream_method:
            check(cls, contract.stream_method, contract)


@pytest.mark.parametrize("server", list(CATALOG))
def test_every_read_route_is_a_method_of_the_serve_class(server: str) -> None:
    spec = CATALOG[server]
    for route, (method, response) in spec.reads.items():
        cls = served_class(spec)
        assert getattr(cls, method, None), f"{server}: GET /{route} calls a missing {method}()"
        assert typing.get_type_hints(getattr(cls, method))["return"] is response


@pytest.mark.parametrize("server", list(CATALOG))
def test_each_server_is_one_package_that_builds_itself(server: str) -> None:
    """What a new server needs: a package of `deployments/` whose `SERVER` is in the
    catalog, with everything the catalog entry names inside that package."""
    spec = CATALOG[server]
    package = importlib.import_module(f"deployments.{server}")
    assert package.SERVER is spec
    for path in (spec.app_builder, spec.serve_class, spec.client, spec.in_process, spec.prepare):
        if path:
            assert path.startswith(f"deployments.{server}."), path
            resolve(path)


@pytest.mark.parametrize("server", list(CATALOG))
def test_a_server_that_says_it_takes_merged_calls_does(server: str) -> None:
    spec = CATALOG[server]
    if spec.client:  # a deployment that is not ours is called one request at a time
        assert not spec.merged_calls
        return
    takes = hasattr(served_class(spec), "call_many")
    assert takes == spec.merged_calls, f"{server}: merged_calls={spec.merged_calls}"
