"""Each model server's own REST surface, served by a thin gateway deployment in front of
the model deployment (Serve model composition, in the server's application).

Why a gateway rather than FastAPI on the model replica itself: a request reaches a
replica through Serve's proxy, and when that replica dies mid-request the proxy answers
a bare 500 (Serve retries only requests no replica had accepted yet). Through the
gateway, a direct call runs as a one-node graph on the same runtime as the pipelines:
the idempotent call is repeated on a live or restarted replica within its deadline, a
full server is a 503 with Retry-After naming it, a deadline a 504, and every error a
JSON body. The model deployment keeps its name, so pipelines call it by handle directly.
"""

# No `from __future__ import annotations`: FastAPI must see each route's real models.
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from ray import serve

from servegraph.engine.runtime import Runtime
from servegraph.errors import InvalidInputError
from servegraph.lang.catalog import Catalog, ServerSpec
from servegraph.lang.compiled import CompiledGraph
from servegraph.lang.graph import Graph, Pipeline, resolve
from servegraph.security.endpoints import RESPONSES, require
from servegraph.security.keys import Caller
from servegraph.serving.http import (
    ErrorBody,
    install_error_handlers,
    install_request_checks,
    make_app,
)
from servegraph.settings import AppSettings, router_actor_options
from servegraph.tenants import TENANT_HEADER, TENANT_PATTERN

GATEWAY_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 512,
    "max_queued_requests": 256,
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
    "ray_actor_options": {"num_cpus": 0.1},
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    **RESPONSES,
    503: {"description": "The model server is full or restarting; retry", "model": ErrorBody},
    504: {"description": "Past the request deadline", "model": ErrorBody},
}


def method_graph(spec: ServerSpec, method: str) -> Graph:
    """`server.method(request)` as a one-node graph: the request's fields in, the
    response out."""
    contract = spec.methods[method]
    p = Pipeline(f"{spec.name}.{method}", input=contract.request, output=contract.response)
    fields = {
        name: getattr(p.input, name)
        for name in contract.request.model_fields
        if name != contract.tenant_field  # the run sets it (`servegraph.tenants`)
    }
    p.returns(p.call(method, spec.name, method, idempotent=contract.idempotent, **fields))
    return p.build()


def build_gateway(spec: ServerSpec, catalog: Catalog, invoke: Any) -> FastAPI:
    """The server's REST app: `POST /<method>` for every method of its contract and
    `GET /<route>` for every read it declares, each open only to an `admin` key
    (pipelines reach the model by handle, not through this surface)."""
    app = make_app(title=spec.name, description=spec.description)
    install_error_handlers(app)
    install_request_checks(app)  # the key, then the body's size, before the body is read
    # The routes, not the app: the docs pages stay open (`SERVEGRAPH_AUTH_OPEN_DOCS`).
    routes = APIRouter(dependencies=[Depends(require("admin"))])
    runtime = Runtime(catalog, invoke)
    for method, contract in spec.methods.items():
        compiled = runtime.compile(method_graph(spec, method))  # once, not per request
        _add_method(routes, runtime, compiled, method, contract.response, contract.tenant_field)
    for route, (method, response) in spec.reads.items():
        _add_read(routes, invoke, spec.name, route, method, response)
    app.include_router(routes)
    return app


def _add_method(
    app: APIRouter,
    runtime: Runtime,
    compiled: CompiledGraph,
    method: str,
    response: Any,
    tenant_field: str | None,
) -> None:
    request_model = compiled.input

    async def call(
        request: request_model,  # type: ignore[valid-type]
        http: Request,
        x_request_timeout: float | None = Header(
            None, gt=0, le=600, description="Deadline in seconds (default 60)."
        ),
        x_servegraph_tenant: str | None = Header(
            None,
            pattern=TENANT_PATTERN,
            description="The tenant whose items the call reads or writes (default: the "
            "key's). The body's `tenant`, where the method has one, says the same.",
        ),
    ) -> Any:
        tenant = _tenant_asked(request, tenant_field, x_servegraph_tenant)
        caller: Caller = http.state.caller  # set by the routes' key check
        return await runtime.run(
            compiled, request, deadline_s=x_request_timeout, tenant=caller.acting_for(tenant)
        )

    app.add_api_route(
        f"/{method}",
        call,
        methods=["POST"],
        response_model=response,
        operation_id=method,
        summary=method.replace("_", " "),
        responses=_ERRORS,
    )


def _tenant_asked(request: Any, field: str | None, header: str | None) -> str | None:
    """The tenant a call to a server's own route asks for: the header's, or the body's
    (where the method has a tenant field and the body sets it); 422 if they differ."""
    body = getattr(request, field) if field and field in request.model_fields_set else None
    if header is not None and body is not None and header != body:
        raise InvalidInputError(
            field or "tenant",
            f"the body names tenant {body!r}, the {TENANT_HEADER} header {header!r}",
            "name one tenant, in either",
        )
    return header if header is not None else body


def _add_read(
    app: APIRouter, invoke: Any, server: str, route: str, method: str, response: Any
) -> None:
    async def read() -> Any:
        return await invoke.read(server, method)

    app.add_api_route(
        f"/{route}",
        read,
        methods=["GET"],
        response_model=response,
        operation_id=route,
        responses=_ERRORS,
    )


def gateway_app(server: str, model: Any, catalog_path: str | None = None) -> Any:
    """The Serve application of a model server: its gateway (the app's ingress, serving
    the REST surface) bound to `model`, the server's bound model deployment. The
    catalog's path is fixed here, where the application is built (default: the
    configured one), not on the replica."""
    path = catalog_path or AppSettings().catalog

    def make_app() -> FastAPI:
        from servegraph.serving.handles import MergeSettings, ServeInvoker

        catalog: Catalog = resolve(path)
        # Concurrent requests travel to the model as merged calls (servegraph.serving.merging),
        # 8 in flight: a replica spends about 7 ms of CPU on each call it is sent,
        # beside the forward pass, so one call per request made the replica the limit
        # over HTTP (benchmarks.path_cpu, 64 wrk callers through HAProxy: 99 items/s,
        # 0.34 of the raw model, replica 14 ms of CPU per item; merged: 205, 0.72,
        # 6 ms). 8 rather than the pipelines' 4 keeps the model's queue fed at the
        # rate HTTP requests arrive (4 held the median batch to 11-14 items).
        invoker = ServeInvoker(catalog, MergeSettings(max_calls=8))
        return build_gateway(catalog[server], catalog, invoker)

    @serve.deployment(name="Gateway")
    @serve.ingress(make_app)
    class Gateway:
        """The REST surface of a model server; the model runs in its own deployment."""

        def __init__(self, model: Any) -> None:
            self.model = model  # bound so Serve deploys it in this application

    actor = GATEWAY_DEFAULTS["ray_actor_options"] | router_actor_options()
    return Gateway.options(**(GATEWAY_DEFAULTS | {"ray_actor_options": actor})).bind(model)  # type: ignore[attr-defined]  # a @serve.deployment class is a Deployment
