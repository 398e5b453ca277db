"""Run a graph: the same executor in-process (plain Python) and inside the Serve ingress.

Only how a model server is reached differs: `InProcessRuntime` calls Python objects,
the Serve ingress calls deployment handles (`servegraph.serving.handles`). Semantics are
shared: independent nodes run concurrently, a request deadline travels down and each
node gets what remains, idempotent nodes retry, fallbacks replace failed nodes, a
request's maximum cost stops it before a call that would exceed it, and a failure names
the node it happened in.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, assert_never

from pydantic import BaseModel, ValidationError

from servegraph._fields import field_errors
from servegraph.cost.budget import Budget, CostModel
from servegraph.cost.metering import charge_of, facts_of
from servegraph.engine import tokens
from servegraph.engine.checkpoints import Checkpoints
from servegraph.engine.ledger import Ledger, usage_of
from servegraph.engine.tokens import Incurred, Tally
from servegraph.errors import (
    BudgetExceededError,
    InvalidInputError,
    NodeFailedError,
    NodeInputError,
    NodeQuotaError,
    NodeTimeoutError,
    OverloadedError,
    PipelineRuntimeError,
    QuotaExceededError,
    ServerUnavailableError,
)
from servegraph.lang._types import function_ports
from servegraph.lang.catalog import Catalog, MethodContract
from servegraph.lang.compiled import CompiledGraph
from servegraph.lang.compiled import compile as compile_graph
from servegraph.lang.graph import (
    INPUT,
    ApprovalNode,
    CallNode,
    Decision,
    FunctionNode,
    Graph,
    LoopNode,
    Node,
    ParallelNode,
    SwitchNode,
)
from servegraph.tenants import DEFAULT_TENANT, check_tenant

DEFAULT_DEADLINE_S = 60.0
_RETRY_BACKOFF_S = 0.05

_node_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "servegraph_node_deadline", default=None
)


def time_left() -> float | None:
    """Seconds until the running node must answer (its timeout or the request's
    deadline), for invokers that retry; None outside a node."""
    deadline = _node_deadline.get()
    return None if deadline is None else deadline - time.monotonic()


class Invoker(Protocol):
    """How a runtime reaches a model server: call `server.method(request)`."""

    async def __call__(self, server: str, method: str, request: BaseModel) -> Any: ...


class StreamInvoker(Protocol):
    """How a runtime reaches a streaming method: iterate `server.method(request)`."""

    def __call__(self, server: str, method: str, request: BaseModel) -> AsyncIterator[Any]: ...


@dataclass
class NodeRecord:
    """What one node did in one request: for responses' usage, traces and tests."""

    node: str
    kind: str
    attempt: int
    status: str  # "ok" | "error" | "timeout" | "fallback" | "budget" (stopped before it)
    # | "cancelled" (the run was, mid-call: recorded for a call that had used LLM tokens)
    wall_ms: float
    error: str | None = None
    usage: dict[str, int] | None = None  # LLM tokens: {"input": n, "output": m}, a failed
    # call's as far as it got
    charge: dict[str, float] | None = None  # the model server's resource-seconds
    start_ms: float = 0.0  # when the attempt began, in ms since the run did (a waterfall's)
    call: dict[str, float] | None = None  # what the model server noted of the call: the
    # dynamic batch it rode in and its wait (`servegraph.cost.metering.note`)


@dataclass(frozen=True)
class Pending:
    """What a waiting run awaits: an approval node's proposed action, for a person."""

    node: str  # qualified: a loop's iteration, a switch's case included
    server: str
    method: str
    arguments: dict[str, Any]  # the action's request as JSON, without its idempotency key
    summary: str
    scope: str | None  # the key scope that may decide (None: `approve:<pipeline>`)
    expires_s: float | None
    editable: list[str] = field(default_factory=list)  # what the person may change


@dataclass(frozen=True)
class Verdict:
    """A person's decision on a waiting approval (or its expiry), for the run to resume
    with. `arguments`, with "approve", replace the proposed ones field by field."""

    decision: Literal["approve", "reject", "expire"]
    by: str | None = None  # the deciding key's name
    reason: str = ""
    arguments: dict[str, Any] | None = None
    # The proposed arguments the person read (`Pending.arguments`): an approval is
    # carried out only for those; a run that resumes with another proposal (its
    # checkpoints lost, or a node run again) stops for a decision on it.
    seen: dict[str, Any] | None = None


class RunWaiting(Exception):  # not a failure: the run stopped to wait
    """The run stopped at an approval node with no decision yet: what it awaits. Every
    node that finished is checkpointed; the run resumes by running again under the same
    `run_id`, with the same checkpoints and the decision (`Runtime.execute`)."""

    def __init__(self, run_id: str, pending: Pending, records: list[NodeRecord]) -> None:
        super().__init__(f"run {run_id} waits for a decision at {pending.node}")
        self.run_id = run_id
        self.pending = pending
        self.records = records


@dataclass
class RunResult:
    output: Any
    nodes: list[NodeRecord] = field(default_factory=list)
    run_id: str = ""


@dataclass
class RunEvent:
    """What a streamed run reports, in order: "node" when a node attempt ends (`data` is
    its `NodeRecord`), "chunk" for each chunk of a `stream=True` call (`data` is the
    contract's chunk model), and last "result" (`data` is the `RunResult`)."""

    kind: Literal["node", "chunk", "result"]
    node: str | None
    data: Any


NodeHook = Callable[[Node, str, int, str], Any]
"""Called as hook(node, qualified_name, attempt, role) around each attempt of a node
(role "attempt") and around its fallback (role "fallback", with the last attempt's
number); may return a context manager."""


class Runtime:
    """Executes validated graphs against model servers reached through `invoke`.

    Args:
        catalog: the server contracts calls are checked against.
        invoke: reaches a model server (objects in-process, handles on Serve).
        node_hook: optional; wraps each node attempt (tracing, metrics).
        invoke_stream: reaches a streaming method; without it, `stream=True` calls
            run as plain calls even in a streamed run.
        costs: what model-server calls have cost lately, learned from every run's
            charges and checked by runs with a `Budget`; share one between runtimes
            that call the same servers.
    """

    def __init__(
        self,
        catalog: Catalog,
        invoke: Invoker,
        node_hook: NodeHook | None = None,
        invoke_stream: StreamInvoker | None = None,
        costs: CostModel | None = None,
    ):
        self.catalog = catalog
        self._invoke = invoke
        self._invoke_stream = invoke_stream
        self._node_hook = node_hook
        self.costs = costs if costs is not None else CostModel()

    def compile(self, graph: Graph | CompiledGraph) -> CompiledGraph:
        """`graph` compiled against this runtime's catalog (as is, if it already is)."""
        return graph if isinstance(graph, CompiledGraph) else compile_graph(graph, self.catalog)

    async def run(
        self, graph: Graph | CompiledGraph, request: BaseModel | dict[str, Any], **kw: Any
    ) -> Any:
        """Run `graph` on `request` and return its output."""
        return (await self.execute(graph, request, **kw)).output

    async def execute(
        self,
        graph: Graph | CompiledGraph,
        request: BaseModel | dict[str, Any],
        *,
        deadline_s: float | None = None,
        records: list[NodeRecord] | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
        budget: Budget | None = None,
        tally: Tally | None = None,
        run_id: str | None = None,
        checkpoints: Checkpoints | None = None,
        decisions: Mapping[str, Verdict] | None = None,
        tenant: str | None = None,
        began: float | None = None,
    ) -> RunResult:
        """Run `graph`, returning its output and a record of every node attempt.

        Raises:
            NodeTimeoutError: a node ran past its timeout or the deadline (504).
            NodeFailedError: a node failed without a fallback (502).
            NodeInputError: a node's input broke its contract (422).
            BudgetExceededError: the next call's estimated cost is more than what is
                left of `budget` (402).

        `records`, when given, receives the node records as they happen, so a caller
        sees them even when the run raises. `deadline_s` defaults to the graph's own,
        else `DEFAULT_DEADLINE_S`. `on_event`, when given, makes this a
        streamed run: it gets "node" and "chunk" events as they happen. `budget`, when
        given, is the request's maximum cost; the run adds to it what it spends.
        `tally`, when given, counts the run's LLM tokens as its calls incur them, those
        of calls that fail, time out or are cancelled included (`servegraph.engine.tokens`).
        `run_id` names the run (a new one by default): the idempotency keys of its
        writes are made of it (`MethodContract.idempotency_field`), so a run repeated
        under the same id applies each of its writes once.

        `checkpoints`, when given, keeps each call's and function's output as it
        finishes, and a node found there is not run again: a run repeated under the
        same id resumes where it stopped. An approval node without a decision in
        `decisions` (by its qualified name) stops the run: `RunWaiting`.

        `tenant`: whose data the run's calls read and write (`servegraph.tenants`; default
        the default tenant): set on every call whose contract has a `tenant_field`.

        `began`: the `time.perf_counter()` the records' `start_ms` count from (default:
        when this run begins; an ingress gives its request's arrival).
        """
        compiled = self.compile(graph)  # a plain Graph is compiled on every call
        deadline_s = deadline_s or default_deadline(compiled.graph)
        run = _Run(self, time.monotonic() + deadline_s, records, on_event, budget, tally)
        run.run_id = run_id or uuid.uuid4().hex
        run.checkpoints, run.decisions = checkpoints, decisions or {}
        run.tenant = check_tenant(tenant) if tenant is not None else DEFAULT_TENANT
        if began is not None:
            run.began = began
        output = await run.graph(compiled, _coerce(compiled.input, request, INPUT), "")
        return RunResult(output, run.records, run.run_id)

    async def stream(
        self,
        graph: Graph | CompiledGraph,
        request: BaseModel | dict[str, Any],
        *,
        deadline_s: float | None = None,
        records: list[NodeRecord] | None = None,
        budget: Budget | None = None,
        tally: Tally | None = None,
        **execute: Any,
    ) -> AsyncGenerator[RunEvent, None]:
        """Run `graph` as a stream: its events as they happen, then the "result" event.
        `execute`: `execute`'s other arguments (a run id, checkpoints, decisions).

        Raises what `execute` raises, after the events that came before the failure.
        Closing the iterator early cancels the run.
        """
        queue: asyncio.Queue[RunEvent] = asyncio.Queue()
        run = asyncio.ensure_future(
            self.execute(
                graph,
                request,
                deadline_s=deadline_s,
                records=records,
                on_event=queue.put_nowait,
                budget=budget,
                tally=tally,
                **execute,
            )
        )
        next_event: asyncio.Future[RunEvent] | None = None
        try:
            while True:
                next_event = asyncio.ensure_future(queue.get())
                await asyncio.wait({next_event, run}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                    continue
                next_event.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                yield RunEvent("result", None, run.result())
                return
        finally:
            run.cancel()
            if next_event is not None:
                next_event.cancel()  # still waiting when the consumer stopped early


class InProcessServers:
    """Model servers as plain Python objects, called as an invoker calls deployments
    (`Invoker`, with `stream` the `StreamInvoker`): what `InProcessRuntime` runs on, and
    what an ingress built in this process (`servegraph.serving.ingress.build_fastapi`)
    can be given.

    Args:
        servers: server name -> the object serving its methods.
        threads: run a synchronous method in a thread, as Serve runs one on its pool,
            so that calls at once overlap; else in the caller's event loop.
    """

    def __init__(self, servers: dict[str, Any], threads: bool = False) -> None:
        self.servers = servers
        self.threads = threads

    async def __call__(self, server: str, method: str, request: BaseModel) -> Any:
        bound = getattr(self.servers[server], method)
        if self.threads and not inspect.iscoroutinefunction(bound):
            return await asyncio.to_thread(bound, request)
        return await _maybe_await(bound(request))

    def stream(self, server: str, method: str, request: BaseModel) -> AsyncIterator[Any]:
        return getattr(self.servers[server], method)(request)


class InProcessRuntime(Runtime):
    """The in-process runtime: model servers are plain Python objects, no Ray.

    Example:
        >>> runtime = InProcessRuntime(catalog, {"embedder": FakeEmbedder()})
        >>> await runtime.run(rag_graph, {"question": "..."})
    """

    def __init__(self, catalog: Catalog, servers: dict[str, Any], **kw: Any) -> None:
        self.servers = servers
        invoker = InProcessServers(servers)
        super().__init__(catalog, invoker, invoke_stream=invoker.stream, **kw)


class _Run:
    """One request's execution state."""

    def __init__(
        self,
        runtime: Runtime,
        deadline: float,
        records: list[NodeRecord] | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
        budget: Budget | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.rt = runtime
        self.deadline = deadline
        self.records: list[NodeRecord] = records if records is not None else []
        self.on_event = on_event
        self.ledger = Ledger(budget, runtime.costs)  # the request's books
        self.streamed: set[str] = set()  # nodes that already sent chunks to the caller
        self.tally = tally if tally is not None else Tally()
        self.incurred: dict[str, Incurred] = {}  # each node's latest call: its LLM tokens
        self.run_id = ""  # set by `Runtime.execute`, with the two below
        self.checkpoints: Checkpoints | None = None
        self._kept: set[str] | None = None  # the checkpointed nodes, when the store says
        self.decisions: Mapping[str, Verdict] = {}
        self.tenant = DEFAULT_TENANT
        self.began = time.perf_counter()  # the records' start_ms count from here

    async def graph(self, compiled: CompiledGraph, request: BaseModel, prefix: str) -> Any:
        graph = compiled.graph
        results: dict[str, asyncio.Future[Any]] = {}
        loop = asyncio.get_running_loop()
        values: dict[str, Any] = {INPUT: request}
        for node in graph.nodes:
            results[node.name] = loop.create_future()

        async def run_node(node: Node) -> None:
            try:
                for dep in compiled.waits_on[node.name]:
                    # Shielded: cancelling this waiter must not cancel the shared result.
                    values[dep] = await asyncio.shield(results[dep])
                output = await self.node(node, compiled, values, prefix)
                values[node.name] = output
                if not results[node.name].done():
                    results[node.name].set_result(output)
            except BaseException as exc:
                if not results[node.name].done():
                    results[node.name].set_exception(exc)
                raise

        # Every node starts at once and waits only on its own inputs, so independent
        # branches overlap; the first failure cancels the rest. A stop for a person's
        # decision does not: the nodes that do not wait on it run to their end (and are
        # checkpointed), so a run resumes with nothing to do again but what follows the
        # decision (the nodes that wait on it stop with it).
        tasks = [asyncio.ensure_future(run_node(node)) for node in graph.nodes]
        stop: RunWaiting | None = None
        try:
            order: dict[asyncio.Future[None], int] = {task: n for n, task in enumerate(tasks)}
            pending: set[asyncio.Future[None]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in sorted(done, key=order.__getitem__):  # the graph's order
                    if task.cancelled():
                        raise asyncio.CancelledError
                    failure = task.exception()
                    if isinstance(failure, RunWaiting):
                        stop = stop or failure
                    elif failure is not None and stop is None:
                        raise failure
                    # A node failing beside a stop is not checkpointed: it runs again
                    # when the run resumes, and the stop is what the caller hears.
            if stop is not None:
                raise stop
        finally:
            for task in tasks:
                task.cancel()
            # Let the cancelled nodes finish unwinding (they settle their results), so
            # that every result below is final when it is marked retrieved.
            await asyncio.wait(tasks)
            for future in results.values():  # silence "exception never retrieved"
                if future.done() and not future.cancelled():
                    future.exception()
        return _build_output(compiled, values)

    async def node(
        self, node: Node, compiled: CompiledGraph, values: dict[str, Any], prefix: str
    ) -> Any:
        """The node's output: from the run's checkpoints when it finished before (a
        call, a function, a decided approval; the others are made of those), else run,
        and checkpointed."""
        qualified = f"{prefix}{node.name}"
        kept = self.checkpoints is not None and isinstance(
            node, CallNode | FunctionNode | ApprovalNode
        )
        if not kept:
            return await self._run_node(node, compiled, values, qualified)
        assert self.checkpoints is not None
        kind = self._output_type(node, compiled)
        if self._kept is None and hasattr(self.checkpoints, "done"):
            # What the run finished before, read once: a new run reads nothing more.
            self._kept = await asyncio.to_thread(self.checkpoints.done, self.run_id)
        if self._kept is None or qualified in self._kept:
            found, output = await asyncio.to_thread(
                self.checkpoints.get, self.run_id, qualified, kind
            )
            if found:
                return output
        output = await self._run_node(node, compiled, values, qualified)
        await asyncio.to_thread(self.checkpoints.put, self.run_id, qualified, output, kind)
        return output

    def _output_type(self, node: Node, compiled: CompiledGraph) -> Any:
        """What a checkpointed node gives, for a durable store to read it back as: a
        call's response model, a function's return annotation (else Any), a Decision."""
        if isinstance(node, CallNode):
            return self.rt.catalog.contract(node.server, node.method).response
        if isinstance(node, FunctionNode):
            return function_ports(compiled.functions[node.name])[1]
        return Decision

    async def _run_node(
        self, node: Node, compiled: CompiledGraph, values: dict[str, Any], qualified: str
    ) -> Any:
        args = {**node.params, **{port: _lookup(values, ref) for port, ref in node.inputs.items()}}
        attempts = 1 + (node.retries if node.idempotent else 0)
        error: PipelineRuntimeError | None = None
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            self.incurred.pop(qualified, None)  # the attempt's own tokens, if it calls an LLM
            try:
                output = await self._attempt(node, compiled, qualified, args, values, attempt)
            except asyncio.CancelledError:
                # The run is cancelled (a caller gone, a sibling failed): what the call
                # incurred is on the tally already; it is on the record too.
                if usage := self._incurred_usage(qualified):
                    self._record(node, qualified, attempt, "cancelled", started, usage=usage)
                raise
            except PipelineRuntimeError as exc:
                error = exc
                if isinstance(
                    exc, NodeInputError | OverloadedError | BudgetExceededError | NodeQuotaError
                ):
                    # Bad input is bad on every attempt; a full server is answered at
                    # once (the caller gets 503 + Retry-After), never retried into; and
                    # a budget or a tenant's limit does not grow.
                    attempts = attempt
                if qualified in self.streamed:
                    attempts = attempt  # a retry would send the caller its chunks twice
            else:
                self._record(
                    node,
                    qualified,
                    attempt,
                    "ok",
                    started,
                    usage=usage_of(self._usage_field(node), output),
                    charge=charge_of(output) if isinstance(node, CallNode) else None,
                    call=facts_of(output) if isinstance(node, CallNode) else None,
                )
                return output
            status = (
                "timeout"
                if isinstance(error, NodeTimeoutError)
                else "budget"
                if isinstance(error, BudgetExceededError)
                else "error"
            )
            usage = self._incurred_usage(qualified)  # a call cut short still used tokens
            self._record(node, qualified, attempt, status, started, str(error), usage=usage)
            if attempt >= attempts or self._remaining() <= _RETRY_BACKOFF_S * 2**attempt:
                break
            await asyncio.sleep(_RETRY_BACKOFF_S * 2 ** (attempt - 1))
        assert error is not None
        if node.fallback is None or isinstance(error, BudgetExceededError | NodeQuotaError):
            raise error  # a budget or quota stop is the caller's answer, not a fault to hide
        started = time.perf_counter()
        work = self._fallback(node, compiled, qualified, args)
        output = await self._hooked(node, qualified, attempts, "fallback", work)
        self._record(node, qualified, attempts, "fallback", started)
        return output

    async def _attempt(
        self,
        node: Node,
        compiled: CompiledGraph,
        qualified: str,
        args: dict[str, Any],
        values: dict[str, Any],
        attempt: int,
    ) -> Any:
        work = self._execute(node, compiled, qualified, args, values)
        return await self._hooked(node, qualified, attempt, "attempt", work)

    async def _hooked(
        self, node: Node, qualified: str, attempt: int, role: str, work: Awaitable[Any]
    ) -> Any:
        """`work` guarded (`_guard`), inside the node hook's context (a span) if any."""
        hook = self.rt._node_hook(node, qualified, attempt, role) if self.rt._node_hook else None
        if hook is None:
            return await self._guard(node, qualified, work)
        with hook:
            return await self._guard(node, qualified, work)

    async def _guard(self, node: Node, qualified: str, work: Awaitable[Any]) -> Any:
        """Apply the node's timeout (capped by the deadline) and name the node in errors."""
        remaining = self._remaining()
        limit = min(node.timeout_s or remaining, remaining)
        if limit <= 0:
            _close(work)
            raise NodeTimeoutError(qualified, "the request deadline passed before it started")
        token = _node_deadline.set(time.monotonic() + limit)  # the work's task copies it
        try:
            return await _within(work, limit)
        except TimeoutError:
            which = (
                "its timeout"
                if node.timeout_s and node.timeout_s <= remaining
                else ("the request deadline")
            )
            raise NodeTimeoutError(qualified, f"ran past {which} ({limit:.3g}s)") from None
        except (PipelineRuntimeError, RunWaiting):
            raise
        except ServerUnavailableError as exc:
            raise OverloadedError(qualified, str(exc), exc.retry_after_s) from exc
        except QuotaExceededError as exc:
            raise NodeQuotaError(qualified, str(exc), exc.limit) from exc
        except (InvalidInputError, ValidationError) as exc:
            raise _input_error(qualified, exc) from exc
        except Exception as exc:
            raise NodeFailedError(qualified, f"{type(exc).__name__}: {exc}") from exc
        finally:
            _node_deadline.reset(token)

    async def _execute(
        self,
        node: Node,
        compiled: CompiledGraph,
        qualified: str,
        args: dict[str, Any],
        values: dict[str, Any],
    ) -> Any:
        if isinstance(node, CallNode):
            if node.stream and self.on_event is not None and self.rt._invoke_stream is not None:
                return await self._call_stream(node, qualified, args)
            return await self._call(node.server, node.method, args, qualified)
        if isinstance(node, FunctionNode):
            return await _maybe_await(compiled.functions[node.name](**args))
        if isinstance(node, SwitchNode):
            key = _case_key(_lookup(values, node.on))
            branch = node.cases.get(key, node.default)
            if branch is None:
                raise InvalidInputError(
                    "on",
                    f"switch value {key!r} matches no case {sorted(node.cases)}",
                    "add a case or a default branch",
                )
            label = f"case[{key}]" if key in node.cases else "default"
            return await self._subgraph(compiled.sub(branch), args, f"{qualified}/{label}/")
        if isinstance(node, ParallelNode):
            names = list(node.branches)
            outputs = await asyncio.gather(
                *(
                    self._subgraph(
                        compiled.sub(node.branches[n]), args, f"{qualified}/branch[{n}]/"
                    )
                    for n in names
                )
            )
            by_branch = dict(zip(names, outputs, strict=True))
            if node.join is None:
                return by_branch
            return await _maybe_await(compiled.functions[f"{node.name}.join"](**by_branch))
        if isinstance(node, LoopNode):
            return await self._loop(node, compiled, qualified, args)
        if isinstance(node, ApprovalNode):
            return await self._approval(node, qualified, args, values)
        assert_never(node)  # a new node kind must say how it runs

    async def _approval(
        self, node: ApprovalNode, qualified: str, args: dict[str, Any], values: dict[str, Any]
    ) -> Decision:
        """Stop for a person (`RunWaiting`), or carry out their decision: approved, the
        action runs, under the key of this run and node, so it is applied once however
        often the decision is carried out."""
        contract = self.rt.catalog.contract(node.server, node.method)
        platforms = {f for f in (contract.idempotency_field, contract.tenant_field) if f}

        def action(fields: dict[str, Any]) -> dict[str, Any]:
            """The action's request, checked, as JSON without what the run sets (its
            key, its tenant)."""
            request = _coerce(contract.request, fields, qualified)
            return request.model_dump(mode="json", exclude=platforms or None)

        proposed = action(args)
        verdict = self.decisions.get(qualified)
        if verdict is not None and verdict.seen is not None and verdict.seen != proposed:
            verdict = None  # decided on another proposal than this: decided again
        if verdict is None:
            summary = str(_lookup(values, node.summary))
            raise RunWaiting(
                self.run_id,
                Pending(
                    qualified,
                    node.server,
                    node.method,
                    proposed,
                    summary,
                    node.scope,
                    node.expires_s,
                    list(node.editable),
                ),
                self.records,
            )
        if verdict.decision != "approve":
            outcome: Literal["rejected", "expired"] = (
                "rejected" if verdict.decision == "reject" else "expired"
            )
            return Decision(
                decision=outcome, by=verdict.by, reason=verdict.reason, arguments=proposed
            )
        edits = dict(verdict.arguments or {})
        refused = sorted(set(edits) - set(node.editable))
        if refused:  # what runs is what the person read, but for what they may change
            raise NodeInputError(
                qualified,
                f"{refused} may not be changed when approving",
                problems=[
                    {
                        "field": name,
                        "error": "not editable at this approval",
                        "fix": f"change only {node.editable or 'nothing'}; reject instead",
                    }
                    for name in refused
                ],
            )
        arguments = action({**proposed, **edits})
        response = await self._call(node.server, node.method, dict(arguments), qualified)
        return Decision(
            decision="approved",
            by=verdict.by,
            reason=verdict.reason,
            arguments=arguments,
            result=response.model_dump(mode="json"),
        )

    async def _loop(
        self, node: LoopNode, compiled: CompiledGraph, qualified: str, args: dict[str, Any]
    ) -> Any:
        until = compiled.functions[f"{node.name}.until"]
        body = compiled.sub(node.body)
        state = _coerce(body.input, args, qualified)
        for iteration in range(node.max_iterations):
            state = await self.graph(body, state, f"{qualified}/iter[{iteration}]/")
            if await _maybe_await(until(state)):
                break
        return state

    async def _subgraph(self, sub: CompiledGraph, args: dict[str, Any], prefix: str) -> Any:
        return await self.graph(sub, _coerce(sub.input, args, prefix), prefix)

    async def _call(self, server: str, method: str, args: dict[str, Any], qualified: str) -> Any:
        contract = self.rt.catalog.contract(server, method)
        args = self._tenanted(contract, self._keyed(contract, args, qualified))
        request, reserved = await self.ledger.afford(qualified, server, method, contract, args)
        response = None
        incurred = self._incurring(qualified, contract)
        counting = tokens._running.set(incurred)
        try:
            with self.ledger.allowing(reserved):
                response = await self.rt._invoke(server, method, request)
            if isinstance(response, dict):
                response = contract.response.model_validate(response)
        finally:
            tokens._running.reset(counting)
            self.ledger.settle(server, method, contract, reserved, response)
            _incurred_by(incurred, contract, response)
        return response

    async def _call_stream(self, node: CallNode, qualified: str, args: dict[str, Any]) -> Any:
        """Forward the chunks of the method's streaming twin; return its last item."""
        assert self.on_event is not None and self.rt._invoke_stream is not None
        contract = self.rt.catalog.contract(node.server, node.method)
        assert contract.stream_method is not None and contract.chunk is not None
        args = self._tenanted(contract, self._keyed(contract, args, qualified))
        request, reserved = await self.ledger.afford(
            qualified, node.server, node.method, contract, args
        )
        response = None
        incurred = self._incurring(qualified, contract)
        counting = tokens._running.set(incurred)
        try:
            with self.ledger.allowing(reserved):
                stream = self.rt._invoke_stream(node.server, contract.stream_method, request)
                async for item in stream:
                    if isinstance(item, contract.response):
                        response = item
                    else:
                        chunk = contract.chunk.model_validate(item)
                        self.streamed.add(qualified)
                        self.on_event(RunEvent("chunk", qualified, chunk))
        finally:
            tokens._running.reset(counting)
            self.ledger.settle(node.server, node.method, contract, reserved, response)
            _incurred_by(incurred, contract, response)
        if response is None:
            raise RuntimeError(f"{contract.stream_method} ended without a final response")
        return response

    async def _fallback(
        self, node: Node, compiled: CompiledGraph, qualified: str, args: dict[str, Any]
    ) -> Any:
        fallback = node.fallback
        assert fallback is not None
        if fallback.function:
            return await _maybe_await(compiled.functions[f"{node.name}.fallback"](**args))
        assert fallback.server and fallback.method
        return await self._call(fallback.server, fallback.method, args, qualified)

    def _keyed(
        self, contract: MethodContract, args: dict[str, Any], qualified: str
    ) -> dict[str, Any]:
        """`args` with the write's idempotency key, where the method takes one and the
        pipeline left it empty: the run's id and the node's qualified name, the same for
        every attempt of this node in this run and different for each loop iteration."""
        name = contract.idempotency_field
        if name is None or args.get(name):
            return args
        return {**args, name: f"{self.run_id}/{qualified}"}

    def _tenanted(self, contract: MethodContract, args: dict[str, Any]) -> dict[str, Any]:
        """`args` with the run's tenant in the contract's `tenant_field`, over any value
        the pipeline wired there."""
        name = contract.tenant_field
        return args if name is None else {**args, name: self.tenant}

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _incurring(self, qualified: str, contract: MethodContract) -> Incurred | None:
        """The count of the LLM tokens a call about to start incurs (for a method that
        reports usage), on the run's tally and as the node's latest call's."""
        if contract.usage is None:
            return None
        incurred = self.incurred[qualified] = self.tally.call()
        return incurred

    def _incurred_usage(self, qualified: str) -> dict[str, int] | None:
        """The LLM tokens the node's latest call incurred, if any."""
        incurred = self.incurred.get(qualified)
        if incurred is None or not (incurred.input or incurred.output):
            return None
        return {"input": incurred.input, "output": incurred.output}

    def _usage_field(self, node: Node) -> str | None:
        if not isinstance(node, CallNode):
            return None
        return self.rt.catalog.contract(node.server, node.method).usage

    def _record(
        self,
        node: Node,
        qualified: str,
        attempt: int,
        status: str,
        started: float,
        error: str | None = None,
        usage: dict[str, int] | None = None,
        charge: dict[str, float] | None = None,
        call: dict[str, float] | None = None,
    ) -> None:
        wall_ms = (time.perf_counter() - started) * 1000
        start_ms = round((started - self.began) * 1000, 3)
        record = NodeRecord(
            qualified, node.kind, attempt, status, wall_ms, error, usage, charge, start_ms, call
        )
        self.records.append(record)
        if self.on_event is not None:
            self.on_event(RunEvent("node", qualified, record))


def default_deadline(graph: Graph) -> float:
    """The deadline a run of `graph` gets when its caller names none."""
    return graph.deadline_s or DEFAULT_DEADLINE_S


# --------------------------------------------------------------------------- helpers


def _incurred_by(incurred: Incurred | None, contract: MethodContract, response: Any) -> None:
    """A call's count made its response's usage, when it has one (the engine's own
    count of the whole reply; a client that reported as it went agrees with it)."""
    if incurred is not None and (usage := usage_of(contract.usage, response)):
        incurred.update(usage["input"], usage["output"])


def _lookup(values: dict[str, Any], ref: str) -> Any:
    head, *fields = ref.split(".")
    value = values[head]
    for name in fields:
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    return value


def _build_output(compiled: CompiledGraph, values: dict[str, Any]) -> Any:
    returns = compiled.graph.returns
    if isinstance(returns, str):
        return _lookup(values, returns)
    return compiled.output(**{name: _lookup(values, ref) for name, ref in returns.items()})


def _coerce(model: type[BaseModel], value: Any, where: str) -> BaseModel:
    if isinstance(value, model):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _input_error(where.rstrip("/") or INPUT, exc) from exc


def _case_key(value: Any) -> str:
    return str(getattr(value, "value", value))


def _input_error(node: str, exc: InvalidInputError | ValidationError) -> NodeInputError:
    if isinstance(exc, InvalidInputError):
        problems = [exc.to_detail()]
    else:
        problems = field_errors(exc.errors(include_url=False))  # type: ignore[arg-type]
    return NodeInputError(node, _describe_input_error(exc), problems)


def _describe_input_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(request)"
        return f"invalid field {field!r}: {first['msg']}"
    return str(exc)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def _within(work: Awaitable[Any], limit: float) -> Any:
    """`asyncio.wait_for`, except that on timeout it does not wait for the work to finish
    cancelling. Cancelling a remote call takes a round trip to its replica (seconds, seen
    under overload), and a deadline's answer must not wait for that: the cancelled work
    winds down in the background."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen (no "exception never retrieved")."""
    if not task.cancelled():
        task.exception()


def _close(work: Awaitable[Any]) -> None:
    if inspect.iscoroutine(work):
        work.close()
