"""The pipeline ingress on Ray Serve: one REST route per pipeline (plain and streamed),
calling model servers through their handles (`servegraph.serving.handles`).

The ingress's FastAPI app is built on the replica (`serve.ingress` with a builder),
from the pipelines it discovers there, so its routes and OpenAPI schemas come from the
graphs and nothing unpicklable travels from the driver.
"""

# No `from __future__ import annotations` here: FastAPI must see the real pipeline input
# model on each route function, and a closure variable cannot be resolved from a string.
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, Field
from ray import serve

from servegraph.console.recent import RecentRequests
from servegraph.console.routes import install_console
from servegraph.cost.budget import Budget, CostModel
from servegraph.cost.metering import total as total_charge
from servegraph.cost.prices import prices
from servegraph.engine import tokens
from servegraph.engine.runtime import (
    NodeRecord,
    RunResult,
    Runtime,
    RunWaiting,
    default_deadline,
)
from servegraph.errors import PipelineRuntimeError
from servegraph.lang.catalog import Catalog
from servegraph.lang.compiled import CompiledGraph
from servegraph.lang.discovery import collect, default_version, discover_versions, version_order
from servegraph.lang.graph import Graph, resolve
from servegraph.lang.render import to_mermaid, to_text
from servegraph.lang.serialize import to_yaml
from servegraph.security.endpoints import RESPONSES, require
from servegraph.security.guard import Guard
from servegraph.security.keys import AuthError, Caller
from servegraph.serving import sse
from servegraph.serving.admission import DEFAULT_MAX_IN_FLIGHT, AdmissionGate, publishing
from servegraph.serving.answer_cache import (
    Lookup,
    ServedCache,
    cache_control,
    lookup_deadline,
    usage_part,
)
from servegraph.serving.handles import ServeInvoker
from servegraph.serving.http import (
    BudgetErrorBody,
    ErrorBody,
    install_error_handlers,
    install_request_checks,
    make_app,
    runtime_error_body,
)
from servegraph.serving.runs import (
    Keeper,
    Runs,
    RunStore,
    Waiting,
    failure_of,
    has_approval,
    runs_router,
)
from servegraph.serving.traffic import VERSION_HEADER, Route, TrafficView
from servegraph.serving.versions import (
    ActorBoard,
    Shadows,
    Signals,
    install_unknown_version_handler,
    primary_ended,
    traffic_router,
    version_picker,
)
from servegraph.settings import AppSettings, router_actor_options
from servegraph.telemetry import tracing
from servegraph.tenants import DEFAULT_TENANT, TENANT_PATTERN

logger = logging.getLogger("ray.serve")

INGRESS_APP = "pipelines"
INGRESS_PREFIX = "/pipelines"
INGRESS_DEFAULTS: dict[str, Any] = {
    # The ingress only awaits model servers, so one replica holds many requests at once
    # (with Serve's default of 5 the LLM's continuous batching never sees more than five
    # pipelines' calls). Each pipeline also has its own limit at the door
    # (`Pipeline(max_in_flight=)`, servegraph.serving.admission).
    "max_ongoing_requests": 256,
    # Past that, the proxy itself answers 503 + Retry-After. A pipeline's keyed requests
    # past its `max_in_flight` are refused before this, by the proxy's front door
    # (`servegraph.serving.proxy_answers.FrontDoor`); this bounds the rest (requests
    # without a valid key, other routes). Serve's router counts as queued every request
    # it has not yet assigned a replica, even while it only probes one, so a burst the
    # front door admitted together (triage's 128) must fit: at 64, Serve refused 4-64
    # of those 128 in 9 of 14 bursts of issue 23's 1,200, at 256 none in 22 (at 8,
    # bursts of 60 got 503s).
    # With HAProxy in front (no front door) the ingress's own gate (`AdmissionGate`,
    # each pipeline's `max_in_flight`) is what refuses a pipeline's overload.
    "max_queued_requests": 256,
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
}

# The largest maximum cost a caller may send (x-servegraph-max-cost-usd), in USD: far
# beyond what any request spends (a `rag` request costs about $1.5e-05), so a budget
# this large runs like none, and small enough that the runtime's arithmetic on it stays
# finite (it is checked there too: `servegraph.engine.runtime`). Past it, or not a finite
# number: 422 naming the header and the bound.
MAX_COST_USD = 1e6

# A deadline the caller names is answered a little before it runs out, so the 504
# (which names the node) reaches the caller before the caller's own timer fires, and
# before Serve's proxy, which enforces `x-request-timeout-seconds` too, answers a bare 408.
_ANSWER_MARGIN_S = 0.25


def build_fastapi(
    graphs: dict[str, Graph],
    catalog: Catalog,
    invoke: Any,
    metrics: Any = None,
    demand: Any = None,
    versions: dict[str, dict[str, Graph]] | None = None,
    board: Any = None,
) -> FastAPI:
    """The ingress app: POST /<pipeline>, GET /<pipeline>/graph, GET / (the list).
    `demand`: told of each arrival and each finished request's records
    (`servegraph.deploy.scaling.board.Reporter`), for graph-aware scaling.

    `versions`: every version of each pipeline (name -> version -> graph; default: the
    one in `graphs`), served side by side on its route; `board`: where the traffic
    splits between them are kept (`servegraph.serving.versions.ActorBoard` on Ray; None:
    each pipeline's default version answers, unless a request pins another)."""
    versions = versions or {name: {g.version: g} for name, g in graphs.items()}
    every = [g for served in versions.values() for g in served.values()]
    store = RunStore(AppSettings().runs_path) if any(map(has_approval, every)) else None
    recorded: list[Runs] = []
    traffic = TrafficView({name: list(v) for name, v in versions.items()}, board)
    every_shadow: list[Shadows] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """While it serves, this replica follows the traffic board, and with runs to
        record it keeps its runs' leases and adopts those of replicas that died
        (`servegraph.serving.runs.Keeper`)."""
        tasks = []
        if board is not None:
            tasks.append(asyncio.create_task(traffic.keep()))
        if store is not None:
            tasks.append(asyncio.create_task(Keeper(store, recorded).keep()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for shadows in every_shadow:  # nobody waits for them: end them with the replica
                for running in list(shadows.running):
                    running.cancel()

    app = make_app(
        title="servegraph pipelines",
        description="One REST endpoint per pipeline graph.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_unknown_version_handler(app)

    @app.get(
        "/",
        summary="List the pipelines",
        dependencies=[Depends(require(None))],
        responses=RESPONSES,
    )
    async def list_pipelines() -> dict[str, Any]:
        return {
            "pipelines": [
                {
                    "name": name,
                    "description": g.description,
                    "route": f"{INGRESS_PREFIX}/{name}",
                    "graph": f"{INGRESS_PREFIX}/{name}/graph",
                    "versions": sorted(versions[name], key=version_order),
                }
                for name, g in graphs.items()
            ]
        }

    app.add_middleware(
        AdmissionGate,
        limits=admission_limits(graphs),
        on_refused=(lambda name: metrics.record(name, 503, 0.0, [])) if metrics else None,
        on_arrival=demand.arrived if demand is not None else None,
    )
    # Starlette runs the middleware added last first. Added last, so run first: the key
    # (401/403 before the body is read), then the body's size (413); only then the
    # admission gate, which so never counts a request without a valid key (a caller
    # without one cannot hold a pipeline's places with slow bodies), and innermost the
    # key's usage (install_error_handlers). Nothing may be added after this.
    install_request_checks(app)
    costs = CostModel()  # one for all: each model server costs the same whoever calls
    recent = RecentRequests()  # this replica's last answers, for the console
    scopes = {name: versions_scope(versions[name].values(), catalog) for name in graphs}
    inputs = {name: resolve(g.input).model_json_schema() for name, g in graphs.items()}
    install_console(app, graphs, catalog, scopes, inputs, recent, INGRESS_PREFIX)
    for graph in graphs.values():
        runtime = Runtime(
            catalog,
            invoke,
            node_hook=tracing.node_hook(graph.name),
            invoke_stream=getattr(invoke, "stream", None),
            costs=costs,
        )
        served = {v: runtime.compile(g) for v, g in versions[graph.name].items()}
        compiled = served[graph.version]
        runs = Runs(compiled, runtime, store) if store and has_approval(graph) else None
        if runs is not None and len(served) > 1:
            raise ValueError(
                f"pipeline {graph.name!r} has an approval node and {len(served)} versions: "
                "serving versions of a pipeline whose runs wait for a person is not "
                "supported yet; serve one version"
            )
        signals = Signals(graph.name, served, metrics)
        shadows = Shadows(graph.name, runtime, served, metrics, signals)
        every_shadow.append(shadows)
        app.include_router(
            pipeline_router(
                compiled, runtime, metrics, demand, runs, served, traffic, shadows, signals, recent
            )
        )
        scope = versions_scope(versions[graph.name].values(), catalog)
        writers = {v: w for v, g in versions[graph.name].items() if (w := writer(g, catalog))}
        app.include_router(
            traffic_router(
                graph.name, scope, list(served), traffic, board, shadows, writers, signals.names
            )
        )
        if runs is not None:
            recorded.append(runs)
            app.include_router(runs_router(runs, scope))
    return app


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    408: {
        "description": "Ray Serve's proxy gave up: `x-request-timeout-seconds` ran out before "
        "the platform could answer (a deadline shorter than the hop to the ingress)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    **RESPONSES,
    402: {
        "description": "The request's maximum cost (`x-servegraph-max-cost-usd`) does not "
        "cover the next node: names the node, its estimated cost and what was left",
        "model": BudgetErrorBody,
    },
    422: {"description": "Invalid field (names the field and the fix)"},
    502: {"description": "A node failed (names the node)", "model": ErrorBody},
    503: {
        "description": "A model server is full or restarting (names the node); retry after "
        "the Retry-After header's seconds",
        "model": ErrorBody,
    },
    504: {"description": "A node ran past the deadline (names the node)", "model": ErrorBody},
}

_STREAM_DESCRIPTION = """Run the pipeline as Server-Sent Events, in order:

- `node`: a node attempt ended: `{node, kind, attempt, status, wall_ms, error, usage,
  charge, start_ms}` (`start_ms`: when it began, in ms since the request arrived)
- `chunk`: a chunk of a streaming node, e.g. LLM text: `{node, text, ...}`
- `usage`: what the request cost (as the `x-servegraph-usage` header of the plain route)
- `result`: the pipeline's output, exactly as the plain route returns it
- `error`, instead of `usage` and `result`, when the run fails after the stream began:
  `{status, error, node, detail}`, status being what the plain route would answer.
- `waiting`, instead of `usage` and `result`, when the run stops for a person's
  decision (a pipeline with an approval node): `{run_id, status, awaiting}`, what the
  plain route answers with 202.

A run that fails before any progress (a chunk, or a node that succeeded) answers with
that status and a JSON body instead, as the plain route does.
The response carries `x-trace-id`; the whole stream is one trace."""


def pipeline_scope(graph: Graph, catalog: Catalog) -> str:
    """The scope a key needs to run `graph`: `write:<name>` when it calls a method that
    writes (`MethodContract.writes`), else `invoke:<name>`. A write an approval node
    proposes is not the caller's: a person with `approve:<name>` carries it out."""
    return f"{'write' if writer(graph, catalog) else 'invoke'}:{graph.name}"


def writer(graph: Graph, catalog: Catalog) -> str | None:
    """The first node of `graph` whose call writes, or None."""
    calls = graph.calls(actions=False)
    return next((c.name for c in calls if catalog.contract(c.server, c.method).writes), None)


def versions_scope(graphs: Iterable[Graph], catalog: Catalog) -> str:
    """The scope a key needs to run a pipeline whose versions are `graphs`: the
    strictest of theirs, as a request may run any of them (its weight, a pin)."""
    scopes = {pipeline_scope(g, catalog) for g in graphs}
    return max(scopes, key=lambda scope: scope.startswith("write:"))


@dataclass(frozen=True)
class _RunOptions:
    """What a run request's headers ask: its deadline (as the caller gave it, in either
    header) and its maximum cost."""

    timeouts: tuple[float | None, float | None]
    budget: Budget | None
    tenant: str | None = None  # the one an admin key acts for (X-Servegraph-Tenant)

    def deadline_for(self, graph: Graph) -> float:
        """The run's deadline on `graph` (the version that runs it: its own default
        applies when the caller named none)."""
        return run_deadline(graph, *self.timeouts)


@dataclass
class _Account:
    """One request's accounting from its start to its answer: its node records, the
    LLM tokens its calls spent (`spent`) and what was reserved for them on the key."""

    started: float
    records: list[NodeRecord]
    http: Request
    caller: Caller
    spent: tokens.Tally
    reserved: int = 0
    chars: int = 0  # the request's size, for the prompt estimate (LLM pipelines only)
    version: str = ""  # the pipeline's version that runs it
    tenant: str = DEFAULT_TENANT  # whose data it reads and writes
    cache: str | None = None  # what the answer cache did: hit, miss, bypass


def _run_options(graph: Graph) -> Callable[..., Awaitable[_RunOptions]]:
    """The headers both run routes take, as one FastAPI dependency (a 422 names a bad
    one): the run's deadline and its maximum cost."""
    deadline_doc = (
        f"Deadline for the whole request, in seconds (default {default_deadline(graph):g}); "
        "a 504 naming the node answers just before it runs out."
    )
    serve_deadline_doc = "Ray Serve's own deadline header; the same as X-Request-Timeout."
    budget_doc = (
        "The most this request may cost, in USD (the price table's, as the usage reports "
        "it): the run stops with 402 before a node whose estimated cost does not fit what "
        "is left, and the LLM's max_tokens is lowered to what is left buys. A finite "
        f"number above 0 and at most {MAX_COST_USD:g} (more than any request spends); "
        "else 422 naming this header."
    )
    tenant_doc = (
        "The tenant whose documents the run reads and writes, for an `admin` key (any "
        "other key runs for its own tenant; naming another is a 403). Default: the key's."
    )

    async def run_options(  # async: FastAPI runs a sync dependency in a thread
        x_request_timeout: float | None = Header(
            None, gt=0, le=600, allow_inf_nan=False, description=deadline_doc
        ),
        x_request_timeout_seconds: float | None = Header(
            None, gt=0, le=600, allow_inf_nan=False, description=serve_deadline_doc
        ),
        x_servegraph_max_cost_usd: float | None = Header(
            None, gt=0, le=MAX_COST_USD, allow_inf_nan=False, description=budget_doc
        ),
        x_servegraph_tenant: str | None = Header(
            None, pattern=TENANT_PATTERN, description=tenant_doc
        ),
    ) -> _RunOptions:
        budget = Budget(x_servegraph_max_cost_usd) if x_servegraph_max_cost_usd else None
        return _RunOptions(
            (x_request_timeout, x_request_timeout_seconds), budget, x_servegraph_tenant
        )

    return run_options


class _Accounting:
    """One pipeline's request accounting, shared by its plain and streamed routes:
    `open` before a run, `close` after it, whatever its outcome."""

    def __init__(
        self,
        graph: Graph,
        catalog: Catalog,
        metrics: Any,
        demand: Any,
        uses_llm: bool,
        recent: RecentRequests | None = None,
    ) -> None:
        self.graph, self.catalog = graph, catalog
        self.metrics, self.demand, self.uses_llm = metrics, demand, uses_llm
        self.recent = recent  # the replica's recent requests, for the console
        self.prompts = tokens.PromptEstimate()  # what the LLM's prompts add to a request

    async def open(
        self,
        request: BaseModel,
        http: Request,
        caller: Caller,
        graph: Graph | None = None,
        tenant: str | None = None,
    ) -> _Account:
        """Before the run on `graph` (a version of the pipeline; default: its default):
        the most LLM tokens it may spend (its LLM calls' max_tokens, and its prompts as
        estimated from the request and recent runs' prompts) reserved from the key's
        token budget (`Guard.reserve`; 429 when it is spent). `tenant`: the one an admin
        key asks to act for (`Caller.acting_for`: 403 for another key)."""
        graph = graph or self.graph
        run = _Account(
            time.perf_counter(),
            [],
            http,
            caller,
            tokens.Tally(),
            version=graph.version,
            tenant=caller.acting_for(tenant),
        )
        http.state.pipeline_version = graph.version  # for the error answers' header too
        if not self.uses_llm:
            return run
        run.chars = len(request.model_dump_json())
        most = self.prompts(run.chars) + tokens.most_output_tokens(graph, self.catalog, request)
        try:
            run.reserved = await Guard.here().reserve(caller, most)
        except AuthError:
            http.state.charged = True  # its 429 is on the key's usage already
            raise
        return run

    async def close(self, run: _Account, status: int) -> float:
        """Record a request's outcome in the metrics and on its key: its LLM tokens, every
        call's as far as it got, charged in place of its reservation. Return its wall
        time in ms."""
        name = self.graph.name
        total_ms = (time.perf_counter() - run.started) * 1000
        used = run.spent.totals()
        if self.metrics is not None:
            try:
                self.metrics.record(name, status, total_ms, run.records)
                if run.version:
                    role = "primary"
                    self.metrics.record_version(
                        name, run.version, role, status, total_ms, run.records
                    )
            except Exception:  # the metrics' loss, never the request's answer
                logger.exception("recording the metrics of a %s request failed", name)
        if self.demand is not None:
            try:
                self.demand.finished(name, run.records, run.version)
            except Exception:  # scaling's loss, never the request's answer
                logger.exception("counting the calls of a %s request failed", name)
        run.http.state.charged = True
        if status == 200 and run.chars:  # a whole run: all of its prompts
            self.prompts.observe(run.chars, used["input"])
        usd = prices().usd(total_charge([r.charge for r in run.records if r.charge]))
        await Guard.here().charge(
            run.caller, status, used, usd, reserved=run.reserved, tenant=run.tenant
        )
        if self.recent is not None:
            try:
                self.recent.add(
                    name,
                    run.version,
                    status,
                    arrived=time.time() - total_ms / 1000,
                    total_ms=total_ms,
                    key=run.caller.name,
                    tenant=run.tenant,
                    records=run.records,
                    cache=run.cache,
                    trace_id=tracing.current_trace_id() if tracing.enabled_here() else None,
                )
            except Exception:  # the console's loss, never the request's answer
                logger.exception("keeping a %s request for the console failed", name)
        return total_ms


def pipeline_router(
    compiled: CompiledGraph,
    runtime: Runtime,
    metrics: Any,
    demand: Any = None,
    runs: Runs | None = None,
    served: Mapping[str, CompiledGraph] | None = None,
    traffic: TrafficView | None = None,
    shadows: Shadows | None = None,
    signals: Signals | None = None,
    recent: RecentRequests | None = None,
) -> APIRouter:
    """One pipeline's routes: POST /<name>, POST /<name>/stream, GET /<name>/graph(.mmd),
    each open only to a key with the pipeline's scope (`pipeline_scope`). With `runs`
    (a pipeline with an approval node), every run is recorded there, and one that stops
    for a decision is answered 202 with its `run_id` (`servegraph.serving.runs`).

    `served`: every version of the pipeline (`compiled` is its default); each request
    runs the one `traffic` chooses (`servegraph.serving.versions.version_picker`), and
    its answer names it in X-Pipeline-Version. `shadows` runs a split's shadow share;
    `signals` records each answer's quality signals for its version."""
    graph = compiled.graph
    served = served or {graph.version: compiled}
    every = [c.graph for c in served.values()]
    uses_llm = any(
        runtime.catalog.contract(c.server, c.method).usage for g in every for c in g.calls()
    )
    guard = require(versions_scope(every, runtime.catalog), llm=uses_llm)
    pick_version = version_picker(graph.name, served, traffic, guard)
    # One check per request: FastAPI runs a dependency the router and a route share once.
    router = APIRouter(dependencies=[Depends(guard)])
    input_model = compiled.input
    output_type = compiled.output
    run_options = _run_options(graph)
    books = _Accounting(graph, runtime.catalog, metrics, demand, uses_llm, recent)
    caching = set(AppSettings().answer_cache_tenants)  # who uses the answer caches
    caches = {
        version: ServedCache(c.graph, runtime, runtime.catalog)
        for version, c in served.items()
        if c.graph.cache is not None and runs is None and caching
    }

    async def cached(
        version: str, request: BaseModel, http: Request, run: _Account, execution: dict
    ) -> Lookup | None:
        """The request's lookup in its version's answer cache, as its Cache-Control
        lets it (`servegraph.serving.answer_cache`); what is left of its deadline goes
        to the run. None: no cache, not for the request's tenant
        (`AppSettings.answer_cache_tenants`), no-cache with no-store, or the lookup
        failed (the request is answered without the cache)."""
        cache = caches.get(version)
        look, keep = cache_control(http.headers.get("cache-control"))
        if cache is None or not (look or keep) or not caching & {"*", run.tenant}:
            return None
        began = time.perf_counter()
        try:
            lookup = await cache.find(
                request,
                deadline_s=lookup_deadline(execution["deadline_s"]),
                records=run.records,
                tenant=run.tenant,
                reuse=look,
                began=run.started,
            )
        except PipelineRuntimeError as exc:
            logger.warning("the answer cache of %s failed (%s); answering without", version, exc)
            return None
        finally:  # what the lookup took is the run's no longer, answered or not
            spent = time.perf_counter() - began
            execution["deadline_s"] = max(execution["deadline_s"] - spent, 0.001)
        lookup.keep = keep
        if not look:
            lookup.result = "bypass"
        run.cache = lookup.result
        if metrics is not None:
            saved = lookup.saved_usd if lookup.hit else 0.0
            metrics.record_cache(graph.name, version, run.tenant, lookup.result, saved)
        return lookup

    async def run_pipeline(
        request: input_model,  # type: ignore[valid-type]
        response: Response,
        http: Request,
        caller: Caller = Depends(guard),  # noqa: B008  # FastAPI's way
        options: _RunOptions = Depends(run_options),  # noqa: B008
        chosen: Route = Depends(pick_version),  # noqa: B008
    ) -> Any:
        target = served[chosen.version]
        run = await books.open(request, http, caller, target.graph, options.tenant)
        execution = _execution(run, options, target.graph)
        shadow = shadows.start(chosen, request, execution) if shadows else None
        status, output, lookup = 200, None, None
        try:
            if runs is None:
                lookup = await cached(chosen.version, request, http, run, execution)
                if lookup is not None and lookup.hit:
                    result = RunResult(lookup.output, run.records, "")
                else:
                    result = await runtime.execute(target, request, **execution)
                    if lookup is not None and lookup.keep:
                        caches[chosen.version].keep(lookup, result.output, run.records, run.tenant)
            else:
                run_id, outcome = await runs.start(request, caller, **execution)
                if isinstance(outcome, Response):  # stopped for a decision: 202
                    status = outcome.status_code
                    return outcome
                result = outcome
                response.headers["x-servegraph-run-id"] = run_id
            output = result.output
        except Exception as exc:
            status = _status_of(exc)
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away; the run is cancelled with it
            raise
        finally:
            try:
                total_ms = await books.close(run, status)
            finally:
                _ended(shadow, run, status, output)
        response.headers.update(
            _usage_headers(
                run.records, total_ms, options.budget, chosen.version, usage_part(lookup)
            )
        )
        if signals is not None and status == 200:
            signals.record(chosen.version, "primary", output)
        return output

    async def stream_pipeline(
        request: input_model,  # type: ignore[valid-type]
        http: Request,
        caller: Caller = Depends(guard),  # noqa: B008  # FastAPI's way
        options: _RunOptions = Depends(run_options),  # noqa: B008
        chosen: Route = Depends(pick_version),  # noqa: B008
    ) -> Response:
        target = served[chosen.version]
        run = await books.open(request, http, caller, target.graph, options.tenant)
        execution = _execution(run, options, target.graph)
        recorded = await runs.begin(request, caller, run.tenant) if runs is not None else {}
        shadow = shadows.start(chosen, request, execution) if shadows else None
        lookup = None
        if runs is None:
            try:
                lookup = await cached(chosen.version, request, http, run, execution)
            except BaseException as exc:
                status = 499 if isinstance(exc, asyncio.CancelledError) else _status_of(exc)
                _ended(shadow, run, status)
                await books.close(run, status)
                raise
        if lookup is not None and lookup.hit:
            _ended(shadow, run, 200, lookup.output)
            total_ms = await books.close(run, 200)
            if signals is not None:
                signals.record(chosen.version, "primary", lookup.output)
            usage = usage_of(run.records, total_ms, options.budget, chosen.version)
            hit = [
                sse.encode("usage", usage | usage_part(lookup)),
                sse.encode("result", jsonable_encoder(lookup.output)),
            ]
            headers = _stream_headers(chosen.version) | {"x-servegraph-cache": "hit"}
            return EventSourceResponse(_replay(hit), headers=headers)
        events = runtime.stream(target, request, **execution, **recorded)
        try:  # a run failing before any progress is answered with its own status
            held = await sse.hold_until_progress(events)
        except RunWaiting as stop:  # stopped for a decision before any progress
            assert runs is not None
            _ended(shadow, run, 202)
            await books.close(run, 202)
            return JSONResponse(await runs.stopped(recorded["run_id"], stop.pending), 202)
        except Exception as exc:
            _ended(shadow, run, _status_of(exc))
            if runs is not None:
                await runs.ended(recorded["run_id"], failure=failure_of(exc))
            await books.close(run, _status_of(exc))
            raise
        except asyncio.CancelledError:
            _ended(shadow, run, 499)
            await events.aclose()
            if runs is not None:  # left running: adopted and finished by a Keeper
                runs.release(recorded["run_id"])
            await books.close(run, 499)
            raise

        async def body() -> AsyncIterator[bytes]:
            status, output = 200, None
            try:
                for event in held[:-1]:
                    yield sse.encode(event.kind, sse.event_data(event))
                event = held[-1]
                while event.kind != "result":
                    yield sse.encode(event.kind, sse.event_data(event))
                    event = await anext(events)
                total_ms = (time.perf_counter() - run.started) * 1000
                usage = usage_of(run.records, total_ms, options.budget, chosen.version)
                yield sse.encode("usage", usage | usage_part(lookup))
                if runs is not None:
                    await runs.ended(recorded["run_id"], event.data.output)
                output = event.data.output
                if signals is not None:
                    signals.record(chosen.version, "primary", output)
                if lookup is not None and lookup.keep:
                    caches[chosen.version].keep(lookup, output, run.records, run.tenant)
                yield sse.encode("result", jsonable_encoder(output))
            except RunWaiting as stop:  # the stream ends with what the run waits for
                assert runs is not None
                status = 202
                yield sse.encode("waiting", await runs.stopped(recorded["run_id"], stop.pending))
            except PipelineRuntimeError as exc:
                status = exc.status_code
                if runs is not None:
                    await runs.ended(recorded["run_id"], failure=runtime_error_body(exc))
                yield sse.encode("error", {"status": status, **runtime_error_body(exc)})
            except (asyncio.CancelledError, GeneratorExit):
                status = 499  # the client went away; the run is cancelled with the stream
                raise
            except Exception as exc:
                status = 500
                if runs is not None:
                    await runs.ended(recorded["run_id"], failure=failure_of(exc))
                error = {"status": 500, "error": type(exc).__name__, "detail": str(exc)}
                yield sse.encode("error", error)
            finally:
                _ended(shadow, run, status, output)
                await events.aclose()
                if runs is not None:  # a run left running is adopted by a Keeper
                    runs.release(recorded["run_id"])
                await books.close(run, status)

        headers = _stream_headers(chosen.version)
        if lookup is not None:
            headers["x-servegraph-cache"] = lookup.result
        return EventSourceResponse(body(), headers=headers)

    waits: dict[int | str, dict[str, Any]] = {}
    if runs is not None:
        waits[202] = {
            "description": "The run stopped for a person's decision (an approval node): its "
            "`run_id` (also the `x-servegraph-run-id` header) and what it awaits; read it at "
            f"GET /{graph.name}/runs/<run_id>",
            "model": Waiting,
        }
    router.add_api_route(
        f"/{graph.name}",
        run_pipeline,
        methods=["POST"],
        response_model=output_type,
        summary=graph.description or f"Run the {graph.name} pipeline",
        name=f"run_{graph.name}",
        operation_id=f"run_{graph.name}",
        responses={**waits, **_ERROR_RESPONSES},
    )
    router.add_api_route(
        f"/{graph.name}/stream",
        stream_pipeline,
        methods=["POST"],
        summary=f"Run the {graph.name} pipeline, streaming its progress and output (SSE)",
        description=_STREAM_DESCRIPTION,
        name=f"stream_{graph.name}",
        operation_id=f"stream_{graph.name}",
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "The event stream"},
            **_ERROR_RESPONSES,
        },
    )

    async def show_graph() -> dict[str, str]:
        return {
            "name": graph.name,
            "mermaid": to_mermaid(graph),
            "text": to_text(graph),
            "yaml": to_yaml(graph),
        }

    async def show_mermaid() -> PlainTextResponse:
        return PlainTextResponse(to_mermaid(graph))

    router.add_api_route(
        f"/{graph.name}/graph",
        show_graph,
        methods=["GET"],
        summary=f"The {graph.name} graph",
        operation_id=f"graph_{graph.name}",
        responses=RESPONSES,
    )
    router.add_api_route(
        f"/{graph.name}/graph.mmd",
        show_mermaid,
        methods=["GET"],
        summary=f"The {graph.name} graph as Mermaid",
        operation_id=f"mermaid_{graph.name}",
        responses=RESPONSES,
    )
    return router


def _ended(shadow: Any, run: _Account, status: int, output: Any = None) -> None:
    """Hand the primary's outcome to its shadow (if any) before anything else that
    could raise on the way out."""
    primary_ended(shadow, status, (time.perf_counter() - run.started) * 1000, output)


def _execution(run: _Account, options: _RunOptions, graph: Graph) -> dict[str, Any]:
    """What a request's run on `graph` is executed with (`Runtime.execute`,
    `Runtime.stream`): its records and token tally (its books), its deadline and its
    maximum cost, the tenant it runs for, and when it began (its records' times count
    from the request's arrival)."""
    return {
        "began": run.started,
        "records": run.records,
        "deadline_s": options.deadline_for(graph),
        "budget": options.budget,
        "tally": run.spent,
        "tenant": run.tenant,
    }


def run_deadline(graph: Graph, *given: float | None) -> float:
    """The run's deadline in seconds: the tightest the caller gave (either header),
    less a margin so the answer leaves in time; else the pipeline's default."""
    named = [d for d in given if d is not None]
    if not named:
        return default_deadline(graph)
    deadline = min(named)
    return deadline - min(_ANSWER_MARGIN_S, deadline * 0.1)


def _status_of(exc: BaseException) -> int:
    return exc.status_code if isinstance(exc, PipelineRuntimeError) else 500


def _tokens(records: list[NodeRecord]) -> dict[str, int]:
    """The request's LLM tokens by direction."""
    tokens = {"input": 0, "output": 0}
    for record in records:
        for direction, n in (record.usage or {}).items():
            tokens[direction] += n
    return tokens


def usage_of(
    records: list[NodeRecord],
    total_ms: float,
    budget: Budget | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """What the request cost: LLM tokens, wall time per node (retries summed), and the
    model servers' resource-seconds per node and in all, priced (USD) and turned into
    energy (joules) by `servegraph.cost.prices.Prices`; with a maximum cost, `budget`: the
    maximum and the nodes whose output tokens were lowered to fit it."""
    tokens = _tokens(records)
    tables = prices()
    nodes_ms: dict[str, float] = {}
    charges: dict[str, dict[str, float]] = {}
    for record in records:
        nodes_ms[record.node] = round(nodes_ms.get(record.node, 0.0) + record.wall_ms, 2)
        if record.charge:
            charges[record.node] = total_charge([charges.get(record.node, {}), record.charge])
    spent = total_charge(list(charges.values()))
    return {
        "llm_input_tokens": tokens["input"],
        "llm_output_tokens": tokens["output"],
        "total_ms": round(total_ms, 2),
        "nodes_ms": nodes_ms,
        "resource_s": {kind: round(v, 6) for kind, v in spent.items()},
        "usd": round(tables.usd(spent), 9),
        "joules": round(tables.joules(spent), 4),
        "nodes_usd": {node: round(tables.usd(c), 9) for node, c in charges.items()},
        **({"budget": budget.report()} if budget is not None else {}),
        **({"version": version} if version else {}),
    }


def _usage_headers(
    records: list[NodeRecord],
    total_ms: float,
    budget: Budget | None,
    version: str,
    cache: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The usage as x-servegraph-usage, the same timings as Server-Timing (shown by
    browsers and `curl -v`), the version that answered, and the trace id; with `cache`,
    what the answer cache did (its part of the usage, and X-Servegraph-Cache)."""
    usage = usage_of(records, total_ms, budget, version) | (cache or {})
    nodes_ms: dict[str, float] = usage["nodes_ms"]
    timing = [f"{_token(node)};dur={ms:.1f}" for node, ms in list(nodes_ms.items())[-20:]]
    headers = {
        "x-servegraph-usage": json.dumps(usage, separators=(",", ":")),
        "server-timing": ", ".join([*timing, f"total;dur={total_ms:.1f}"]),
        VERSION_HEADER: version,
    }
    if cache:
        headers["x-servegraph-cache"] = cache["cache"]
    trace_id = tracing.current_trace_id()
    if trace_id:
        headers["x-trace-id"] = trace_id
    return headers


def _stream_headers(version: str) -> dict[str, str]:
    headers = {"cache-control": "no-cache", VERSION_HEADER: version}
    if trace_id := tracing.current_trace_id():
        headers["x-trace-id"] = trace_id
    return headers


async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _token(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class IngressArgs(BaseModel):
    """What the ingress needs to rebuild everything on its replica."""

    catalog: str = Field(default_factory=lambda: AppSettings().catalog)
    packages: list[str] = Field(default_factory=lambda: [AppSettings().pipelines])
    names: list[str] | None = None
    graphs_yaml: list[str] = []
    deployment: dict[str, Any] = {}


def load_graphs(args: IngressArgs) -> dict[str, dict[str, Graph]]:
    """Every version of every pipeline the ingress serves: name -> version -> graph."""
    from servegraph.lang.serialize import from_yaml

    graphs: dict[str, dict[str, Graph]] = {}
    for package in args.packages:
        graphs.update(discover_versions(package))
    carried = collect(
        (from_yaml(text), f"graphs_yaml[{n}]") for n, text in enumerate(args.graphs_yaml)
    )
    graphs.update(carried)
    if args.names is not None:
        graphs = {n: g for n, g in graphs.items() if n in args.names}
    return graphs


def ingress_app(args: IngressArgs | dict[str, Any]) -> Any:
    """Serve application builder for the pipelines ingress (also a `serve deploy` target)."""
    args = IngressArgs.model_validate(args)

    def make_app() -> FastAPI:
        catalog: Catalog = resolve(args.catalog)
        versions = load_graphs(args)  # compiled, so validated, by build_fastapi
        graphs = {name: v[default_version(v)] for name, v in versions.items()}
        from servegraph.deploy.scaling.board import Reporter
        from servegraph.telemetry.metrics import PipelineMetrics

        invoker = ServeInvoker(catalog)
        every = [g for served in versions.values() for g in served.values()]
        invoker.prepare({call.server for g in every for call in g.calls()})
        context = serve.get_replica_context()
        if context.app_name == INGRESS_APP:  # mounted at INGRESS_PREFIX
            publishing(
                context.replica_tag,
                INGRESS_PREFIX,
                admission_limits(graphs),
                {n: versions_scope(v.values(), catalog) for n, v in versions.items()},
            )
        return build_fastapi(
            graphs,
            catalog,
            invoker,
            PipelineMetrics(),
            Reporter(graphs, versions=versions),
            versions,
            ActorBoard(),
        )

    @serve.deployment(name="PipelineIngress")
    @serve.ingress(make_app)
    class PipelineIngress:
        """Runs every pipeline; model work happens in the model servers' replicas."""

    routed = router_actor_options()
    placement = {"ray_actor_options": routed} if routed else {}
    deployment = PipelineIngress.options(**(INGRESS_DEFAULTS | placement | args.deployment))  # type: ignore[attr-defined]  # a @serve.deployment class is a Deployment
    return deployment.bind()


def admission_limits(graphs: dict[str, Graph]) -> dict[str, int]:
    """Each pipeline's requests in flight that one ingress replica admits (its gate's
    limits, and what the replica publishes for Serve's proxies:
    `servegraph.serving.proxy_answers.FrontDoor`)."""
    return {name: g.max_in_flight or DEFAULT_MAX_IN_FLIGHT for name, g in graphs.items()}
