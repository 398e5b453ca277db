"""The model-server catalog: what each server is called and the typed contract it serves.

A graph refers to model servers by name only; the catalog says which methods a server
has and the pydantic request/response model of each, so a graph can be validated
without loading (or even importing) a model. The catalog also says how to build the
server's Serve application, by import path, for the planner.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from servegraph.errors import CatalogError
from servegraph.lang.graph import resolve


@dataclass(frozen=True)
class MethodContract:
    """A server method: one pydantic request model in, one response model out.

    A method that can stream also names its streaming twin, `stream_method`: an async
    generator taking the same request that yields `chunk` models as they are produced
    and, last, the complete `response`. A call node with `stream=True` uses it when the
    caller asked for a stream, so the graph's downstream nodes still get the response.
    """

    request: type[BaseModel]
    response: type[BaseModel]
    chunk: type[BaseModel] | None = None
    stream_method: str | None = None
    usage: str | None = None
    """The response's field that reports LLM token usage (a model with `input_tokens`
    and `output_tokens`): the platform adds it to the request's usage (the
    `x-servegraph-usage` header, the stream's `usage` event, the token metrics)."""
    budget_field: str | None = None
    """The request's field that bounds how many output tokens the call spends (the
    LLM's `max_tokens`; needs `usage`): a request with a maximum cost has it lowered to
    what the remaining budget buys at the method's recent cost per token
    (`servegraph.cost.budget.CostModel`)."""
    writes: bool = False
    """Changes what the server holds (an index write): a pipeline that calls it needs
    the `write:<pipeline>` scope, not `invoke:` (`servegraph.security`)."""
    idempotent: bool = False
    """Safe to run twice with the same request (no side effect, or an upsert): when a
    replica dies mid-call, the platform repeats the call on another replica, or on the
    restarted one, within the request's deadline. A non-idempotent call fails with 503."""
    idempotency_field: str | None = None
    """The request's field that carries an idempotency key (a write applied once per
    key, the key recorded by the server in the same transaction as the change, and the
    first outcome answered again to a repeat). A run fills it, where the pipeline left
    it empty, with a key made of the run's id and the node's name (`run_id/node`, a
    loop's iteration included), so a call repeated after a replica died, or by a
    node's retry, changes the data once. A caller of the server's own route sends its
    own key. Needs `writes` and `idempotent` (a repeat with the key is safe)."""
    tenant_field: str | None = None
    """The request's field that names the tenant whose data the call reads or writes
    (`servegraph.tenants`). A run sets it on every call to the tenant it runs for (the
    request key's, or the one an admin key acts for), over whatever the pipeline wired:
    no pipeline can reach another tenant's data, or forget to say whose it reads. The
    server applies it in its own store."""

    def __post_init__(self) -> None:
        if self.tenant_field is not None and self.tenant_field not in self.request.model_fields:
            raise CatalogError(
                f"`tenant_field` {self.tenant_field!r} is not a field of {self.request.__name__}"
            )
        if self.idempotency_field is not None:
            if self.idempotency_field not in self.request.model_fields:
                raise CatalogError(
                    f"`idempotency_field` {self.idempotency_field!r} is not a field of "
                    f"{self.request.__name__}"
                )
            if not (self.writes and self.idempotent):
                raise CatalogError(
                    "an `idempotency_field` is for a write (`writes=True`) made safe to "
                    "repeat by its key (`idempotent=True`)"
                )
        if (self.chunk is None) != (self.stream_method is None):
            raise CatalogError("a streaming method needs both `chunk` and `stream_method`")
        if self.budget_field is not None:
            if self.usage is None:
                raise CatalogError("a `budget_field` needs `usage`: its tokens are what it bounds")
            if self.budget_field not in self.request.model_fields:
                raise CatalogError(
                    f"`budget_field` {self.budget_field!r} is not a field of "
                    f"{self.request.__name__}"
                )


@dataclass(frozen=True)
class ServerSpec:
    """A model server as the platform sees it.

    Args:
        name: the name graphs use, and the Serve application's name.
        methods: method name -> contract.
        app_builder: import path of ``build(**options) -> serve.Application``.
        deployment: the Serve deployment name inside that application that
            handles method calls.
        route_prefix: where the server's own REST surface is mounted.
        client: import path of a class wrapping the deployment handle when the
            deployment does not take the contract's request model directly (the LLM).
        serve_class: import path of the Serve deployment whose methods serve the
            contract (where there is no `client`): checked against it by the tests.
        in_process: import path of the class that serves the contract in this process,
            constructed with no arguments (or `options`): what `in_process_servers`
            builds for `InProcessRuntime`.
        prepare: import path of the server's idempotent set-up step (convert or train
            a model), run before the first deployment.
        reads: GET routes of the REST surface (see the attribute).
        merged_calls: the Serve class accepts merged calls
            (`servegraph.serving.merging.accepts_merged_calls`): concurrent calls from one
            process to one of its methods then travel as one handle call.
        cold_start_s: seconds from the decision to start a replica to its first answer
            (`benchmarks.cold_start`). A call to a server with no replica running (scaled
            to zero) whose deadline leaves less than this is refused at once (503 with
            this as Retry-After) rather than left to wait past its deadline
            (`servegraph.serving.handles`). None: never refused for it.
    """

    name: str
    methods: Mapping[str, MethodContract]
    app_builder: str
    deployment: str
    route_prefix: str
    client: str | None = None
    serve_class: str | None = None
    in_process: str | None = None
    prepare: str | None = None
    description: str = ""
    reads: Mapping[str, tuple[str, type[BaseModel]]] = field(default_factory=dict)
    """Argument-less GET routes of the server's REST surface: route -> (deployment
    method, response model), e.g. ``{"stats": ("batch_stats", BatchStats)}``."""
    merged_calls: bool = False
    cold_start_s: float | None = None
    models: str | None = None
    """Import path of a function of no arguments returning the folders of the model files
    the server loads (by default): answers cached from a pipeline that calls it are kept
    for those files only (`servegraph.serving.answer_cache`)."""

    def deployment_name(self) -> str:
        """The Serve deployment that handles its method calls; a "module:function"
        `deployment` is computed at run time (the LLM's depends on its model)."""
        return resolve(self.deployment)() if ":" in self.deployment else self.deployment


@dataclass
class Catalog(Mapping[str, ServerSpec]):
    """Server name -> `ServerSpec`."""

    servers: dict[str, ServerSpec] = field(default_factory=dict)

    def __init__(self, servers: list[ServerSpec] | None = None) -> None:
        self.servers = {s.name: s for s in servers or []}

    def __getitem__(self, name: str) -> ServerSpec:
        try:
            return self.servers[name]
        except KeyError:
            raise CatalogError(
                f"unknown model server {name!r}; known: {sorted(self.servers)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def in_process_servers(
        self, skip: Collection[str] = (), options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Every server's `in_process` class, constructed in this process on the real
        models (with `options[name]` as keyword arguments), but those in `skip`."""
        options = options or {}
        return {
            name: resolve(spec.in_process)(**options.get(name, {}))
            for name, spec in self.servers.items()
            if name not in skip and spec.in_process
        }

    def contract(self, server: str, method: str) -> MethodContract:
        spec = self[server]
        try:
            return spec.methods[method]
        except KeyError:
            raise CatalogError(
                f"model server {server!r} has no method {method!r}; it has: {sorted(spec.methods)}"
            ) from None
