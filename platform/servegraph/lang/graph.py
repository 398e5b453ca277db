"""The pipeline graph: a light, serialisable description of a DAG of nodes.

A `Graph` is data only: node kinds, names, wiring (refs) and options, with Python
objects referred to by import path ("package.module:name"). It dumps to YAML and loads
back equal, and nothing in it loads a model. `Pipeline` is the Python builder that
reads like the pipeline it describes::

    rag = Pipeline("rag", input=Question, output=Answer)
    emb = rag.call("embed", embedder.embed_one(text=rag.input.question))
    hits = rag.call("retrieve", vector_index.search(vector=emb.vector, k=rag.input.k))
    prompt = rag.function("prompt", build_prompt, question=rag.input.question, hits=hits.hits)
    reply = rag.call("generate", llm.chat(messages=prompt.messages, temperature=0.0))
    rag.returns(answer=reply.text, hits=hits.hits)

Refs name a value: ``input`` (the request), ``input.field``, ``node`` (a node's
output) or ``node.field.sub``. Values that are not refs become constant params. A call
names its server's method as a typed object (`servegraph.lang.calls`) or by strings
(``rag.call("embed", "embedder", "embed_one", text=...)``); both build the same node.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, overload

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

if TYPE_CHECKING:
    from servegraph.lang.calls import Bound

INPUT = "input"
_R = TypeVar("_R", bound=BaseModel)


# --------------------------------------------------------------------------- specs


class DeploymentOverrides(BaseModel):
    """Serve deployment options a pipeline asks of a model server, over its defaults."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config (min_replicas, max_replicas, ...)."
    )
    ray_actor_options: dict[str, Any] | None = Field(
        None, description="Resources per replica, e.g. {'num_cpus': 1, 'num_gpus': 0.25}."
    )
    max_ongoing_requests: int | None = Field(None, ge=1)


class _NodeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    name: str = Field(description="Unique within its graph; names the node in errors.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Port name -> ref ('input.x', 'node', 'node.y')."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Port name -> constant.")
    timeout_s: float | None = Field(None, gt=0, description="Per-attempt time limit.")
    retries: int = Field(0, ge=0, description="Extra attempts; only for idempotent nodes.")
    idempotent: bool = Field(False, description="Safe to run twice with the same input.")
    fallback: FallbackSpec | None = Field(
        None, description="Run instead, with the same inputs, when this node fails."
    )

    def references(self) -> list[str]:
        """The refs this node reads ('input.x', 'node', 'node.y')."""
        return list(self.inputs.values())

    def dependencies(self) -> set[str]:
        """Names (nodes or 'input') this node reads from."""
        return {ref.split(".", 1)[0] for ref in self.references()}

    def children(self) -> list[tuple[str, Graph]]:
        """The node's sub-graphs with their labels (case, branch, "body"), for the walks
        over a graph (planning, rendering); none for a call or a function."""
        return []

    def imports(self) -> dict[str, str]:
        """The functions this node runs, by import path, keyed as the compiled graph
        holds them (`CompiledGraph.functions`): the node's name, or name.role."""
        if self.fallback and self.fallback.function:
            return {f"{self.name}.fallback": self.fallback.function}
        return {}

    def describe(self) -> str:
        """A few words on what the node does, for renderings ("call llm.chat")."""
        raise NotImplementedError  # every kind says

    @model_serializer(mode="wrap")
    def _kind_first(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `kind` is the union's discriminator: keep it even when dumping without defaults.
        return {"kind": self.kind, **handler(self)}  # type: ignore[attr-defined]  # every kind has one


class FallbackSpec(BaseModel):
    """What runs when a node fails: a function or a model server method, same inputs."""

    model_config = ConfigDict(extra="forbid")

    function: str | None = None
    server: str | None = None
    method: str | None = None


class CallNode(_NodeBase):
    """Call a method of a model server (a Serve deployment, through its handle)."""

    kind: Literal["call"] = "call"
    server: str
    method: str
    deployment: DeploymentOverrides | None = None
    stream: bool = Field(
        False,
        description="Forward the method's chunks (e.g. LLM tokens) to a streaming request.",
    )

    def describe(self) -> str:
        return f"call {self.server}.{self.method}"


class FunctionNode(_NodeBase):
    """Run a plain Python function (sync or async), referred to by import path."""

    kind: Literal["function"] = "function"
    function: str

    def imports(self) -> dict[str, str]:
        return {**super().imports(), self.name: self.function}

    def describe(self) -> str:
        return f"function {self.function.split(':')[-1]}"


class SwitchNode(_NodeBase):
    """Run one of several sub-graphs, chosen by the value of `on` (compared as text)."""

    kind: Literal["switch"] = "switch"
    on: str
    cases: dict[str, Graph]
    default: Graph | None = None

    def references(self) -> list[str]:
        return [*super().references(), self.on]

    def children(self) -> list[tuple[str, Graph]]:
        return [*self.cases.items(), *([("default", self.default)] if self.default else [])]

    def describe(self) -> str:
        return f"switch on {self.on}"


class ParallelNode(_NodeBase):
    """Fan out: run every branch concurrently on the same inputs, then join."""

    kind: Literal["parallel"] = "parallel"
    branches: dict[str, Graph]
    join: str | None = Field(
        None,
        description="Function taking each branch's output by branch name; "
        "without it the output is a dict of branch name -> output.",
    )

    def children(self) -> list[tuple[str, Graph]]:
        return list(self.branches.items())

    def imports(self) -> dict[str, str]:
        join = {f"{self.name}.join": self.join} if self.join else {}
        return {**super().imports(), **join}

    def describe(self) -> str:
        return f"parallel x{len(self.branches)}"


class LoopNode(_NodeBase):
    """Repeat a sub-graph, feeding its output back as its input, until `until` holds."""

    kind: Literal["loop"] = "loop"
    body: Graph
    until: str = Field(description="Function state -> bool, by import path.")
    max_iterations: int = Field(ge=1, le=1000)

    def children(self) -> list[tuple[str, Graph]]:
        return [("body", self.body)]

    def imports(self) -> dict[str, str]:
        return {**super().imports(), f"{self.name}.until": self.until}

    def describe(self) -> str:
        return f"loop ≤{self.max_iterations}"


MAX_APPROVAL_S = 30 * 24 * 3600.0


class ApprovalNode(_NodeBase):
    """Stop the run until a person decides on an action: a write of a model server
    (`server.method`, with the request its ports build, applied once under the run's
    key for this node). Approved (the arguments perhaps edited), the action runs and
    the node's output is the `Decision` with its result; rejected, or not decided
    within `expires_s`, the action does not run and the `Decision` says so. While the
    run waits, it is a resource a decision resumes (`servegraph.engine.runtime`)."""

    kind: Literal["approval"] = "approval"
    server: str
    method: str
    summary: str = Field(description="Ref to the text the person reads before deciding.")
    scope: str | None = Field(
        None,
        pattern=r"^approve:[\w.-]+$",
        description="The key scope that may decide (else `approve:<pipeline>`).",
    )
    expires_s: float | None = Field(
        None,
        gt=0,
        le=MAX_APPROVAL_S,
        description="Undecided this long after the run stopped: the action expires.",
    )
    editable: list[str] = Field(
        default_factory=list,
        description="The action's fields a person may change when approving (none by "
        "default: what runs is what they read); any other edit is refused.",
    )

    def references(self) -> list[str]:
        return [*super().references(), self.summary]

    def describe(self) -> str:
        return f"approval of {self.server}.{self.method}"


class Decision(BaseModel):
    """An approval node's output: what was decided, by whom, and what the action gave."""

    decision: Literal["approved", "rejected", "expired"]
    by: str | None = Field(None, description="The name of the key that decided.")
    reason: str = Field("", description="Why, as the person wrote it (a rejection's).")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="The action's request, as run (or proposed)."
    )
    result: dict[str, Any] | None = Field(
        None, description="The action's response, when it was approved and ran."
    )


Node = Annotated[
    CallNode | FunctionNode | SwitchNode | ParallelNode | LoopNode | ApprovalNode,
    Field(discriminator="kind"),
]


# A version is a short token that can travel in a header and a metric's label.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
DEFAULT_VERSION = "v1"


class AnswerCache(BaseModel):
    """A pipeline's semantic answer cache (`servegraph.serving.answer_cache`): a request
    whose question is close enough to one answered before, by the same tenant, pipeline
    version and models, gets that answer without running the graph; the answer is
    forgotten the moment a chunk it was built from is written.

    The platform embeds the `question` field with `embed` and keeps the answers in
    `store` (a server with `answers_get` and `answers_put`: the vector index, where the
    chunks are, so a write and the answers it makes stale go in one transaction)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="The input field holding the question's text.")
    sources: str = Field(
        description="Where the output lists the chunks the answer was built from: "
        "'<list field>.<id field>' (rag: 'passages.id')."
    )
    threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="The least similarity (cosine) of two questions for one answer to "
        "serve both; tuned on labelled pairs (`pipelines/rag/eval/cache_pairs.jsonl`).",
    )
    max_age_s: float = Field(
        86_400,
        gt=0,
        le=30 * 86_400,
        description="The oldest answer reused, in seconds (a day): an answer is forgotten "
        "when a chunk it was built from changes, not when a document it did not use is "
        "added; this bounds how long a newer, better source can go unread.",
    )
    embed: str = Field("embedder.embed_one", description="server.method: {text} -> {vector}.")
    store: str = Field("vector_index", description="The server keeping the answers.")
    cacheable: str | None = Field(
        None,
        description="Import path of a function from the output to bool: whether this "
        "answer may be kept (e.g. not one that found nothing). Default: every answer.",
    )


class Graph(BaseModel):
    """A pipeline (or a sub-graph of one): typed input, nodes, and what it returns."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = Field(
        DEFAULT_VERSION,
        pattern=VERSION_PATTERN,
        description="Which version of the pipeline this graph is: several versions of one "
        "name are served side by side, on the same route (`servegraph.serving.traffic`).",
    )
    description: str = ""
    input: str = Field(description="Import path of the input pydantic model.")
    output: str = Field(description="Import path of the output type.")
    nodes: list[Node] = Field(default_factory=list)
    returns: str | dict[str, str] = Field(
        description="A ref to return, or output field -> ref to build the output model."
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=600,
        description="Default request deadline when the caller sends no X-Request-Timeout "
        "(else the platform's 60 s): an agent's several LLM steps may need more than a lookup.",
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Requests of this pipeline one ingress replica runs at once; past it, "
        "503 + Retry-After at once, before any work (else the platform's 256). Size it to "
        "what the pipeline's slowest model server can take, so doomed work is not admitted.",
    )
    signals: str | None = Field(
        None,
        description="Import path of a function from the pipeline's output to "
        "{signal: number}: what an answer says about its quality without a label (for "
        "`rag`, whether the LLM's answer was kept, its citations), recorded per version "
        "so that versions can be compared on live traffic.",
    )
    cache: AnswerCache | None = Field(
        None, description="Answer repeated questions from a cache (`AnswerCache`)."
    )

    def calls(self, actions: bool = True) -> list[CallNode]:
        """Every model-server call the graph may make, its sub-graphs' and fallbacks'
        included (a fallback call as a node named `<node>.fallback`); with `actions`,
        the actions its approval nodes carry out once a person approves."""
        found: list[CallNode] = []
        for node in self.nodes:
            if isinstance(node, CallNode):
                found.append(node)
            if isinstance(node, ApprovalNode) and actions:  # its action, once approved
                found.append(CallNode(name=node.name, server=node.server, method=node.method))
            if node.fallback and node.fallback.server:
                found.append(
                    CallNode(
                        name=f"{node.name}.fallback",
                        server=node.fallback.server,
                        method=node.fallback.method or "",
                    )
                )
            for _, sub in node.children():
                found += sub.calls(actions)
        return found

    def returns_refs(self) -> list[str]:
        """The refs the graph's output is built from."""
        return [self.returns] if isinstance(self.returns, str) else list(self.returns.values())

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


_NodeBase.model_rebuild()
for _model in (CallNode, FunctionNode, SwitchNode, ParallelNode, LoopNode, ApprovalNode, Graph):
    _model.model_rebuild()


# --------------------------------------------------------------------------- import paths


def import_path(obj: Any) -> str:
    """The "module:qualname" path a Graph stores for a class or function."""
    if isinstance(obj, str):
        return obj
    return f"{obj.__module__}:{obj.__qualname__}"


def signal_names(function: Callable[..., Any]) -> tuple[str, ...] | None:
    """The signals a `Graph.signals` function declares: the keys of the TypedDict its
    return is annotated with, so a rollout's gates can be checked against them before
    any answer is read. None when the return is not a TypedDict."""
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:  # an annotation that does not resolve declares nothing
        return None
    if returned is None or not typing.is_typeddict(returned):
        return None
    return tuple(typing.get_type_hints(returned))


@lru_cache(maxsize=1024)
def resolve(path: str) -> Any:
    """Import "module:qualname" (or "module.qualname") and return the object."""
    module_name, _, qualname = path.partition(":")
    if not qualname:
        module_name, _, qualname = path.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- builder


class Ref:
    """A value in the graph: the request, a node's output, or a field of either."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __getattr__(self, field: str) -> Ref:
        if field.startswith("_"):
            raise AttributeError(field)
        return Ref(f"{self.path}.{field}")

    def __repr__(self) -> str:
        return f"Ref({self.path!r})"


class Pipeline:
    """Builds a `Graph` in Python. Each node method returns a `Ref` to its output.

    Args:
        name: the pipeline's name; its REST route is ``/pipelines/<name>``.
        input: pydantic model of the request.
        output: type of the response (usually a pydantic model).
        description: shown in OpenAPI and the rendered graph.
        deadline_s: the default request deadline (else 60 s).
        max_in_flight: requests one ingress replica runs at once (else 256); past it,
            503 + Retry-After before any work (`servegraph.serving.admission`).
        version: which version of the pipeline this is (else "v1"); versions of one
            name are served side by side on its route (`servegraph.serving.traffic`).
        signals: a function from the output to {signal: number}, the answer's quality
            signals that need no label, recorded per version (`servegraph.serving.versions`).
        cache: answer repeated questions from a semantic cache that forgets an answer
            when a chunk it was built from changes (`AnswerCache`).
    """

    def __init__(
        self,
        name: str,
        *,
        input: type[BaseModel],
        output: type,
        description: str = "",
        deadline_s: float | None = None,
        max_in_flight: int | None = None,
        version: str = DEFAULT_VERSION,
        signals: Callable[[Any], Mapping[str, object]] | None = None,
        cache: AnswerCache | None = None,
    ) -> None:
        self.name = name
        self.cache = cache
        self.version = version
        self.signals = import_path(signals) if signals else None
        self.deadline_s = deadline_s
        self.max_in_flight = max_in_flight
        self.input = Ref(INPUT)
        self._input_type = input
        self._output_type = output
        # The input model's own docstring, not one it inherits (pydantic's BaseModel's).
        own = input.__dict__.get("__doc__") if isinstance(input, type) else None
        self._description = description or (inspect.cleandoc(own) if own else "")
        self._nodes: list[Any] = []
        self._returns: str | dict[str, str] | None = None

    # Node kinds ------------------------------------------------------------

    @overload
    def call(
        self,
        name: str,
        target: Bound[_R],
        /,
        *,
        deployment: DeploymentOverrides | dict[str, Any] | None = None,
        stream: bool = False,
        timeout_s: float | None = None,
        retries: int = 0,
        idempotent: bool = False,
        fallback: Any = None,
    ) -> _R: ...

    @overload
    def call(
        self,
        name: str,
        target: str,
        method: str,
        /,
        *,
        deployment: DeploymentOverrides | dict[str, Any] | None = None,
        stream: bool = False,
        **ports: Any,
    ) -> Ref: ...

    def call(
        self,
        name: str,
        target: Any,
        method: str | None = None,
        /,
        *,
        deployment: DeploymentOverrides | dict[str, Any] | None = None,
        stream: bool = False,
        **ports: Any,
    ) -> Any:
        """Call a model server's method with a request built from its ports: a typed
        `Bound` (``embedder.embed_one(text=...)``, `servegraph.lang.calls`), whose
        output is typed as the method's response, or `server` and `method` by name with
        the ports as keyword arguments. The other keyword arguments are the node's
        options (`timeout_s`, `retries`, `idempotent`, `fallback`).

        With `stream=True`, a request run as a stream (`/<pipeline>/stream`) gets the
        method's chunks as they come; the node's output is the complete response either way.
        """
        from servegraph.lang.calls import Bound

        options, ports = _split_options(ports)
        if isinstance(target, Bound):
            if method is not None:
                raise TypeError(f"{name}: a typed call names its method already")
            if ports:
                raise TypeError(f"{name}: the request's fields go in the method call: {ports}")
            server, method, ports = target.server, target.method, dict(target.ports)
        elif isinstance(target, str) and isinstance(method, str):
            server = target
        else:
            raise TypeError(f"{name}: call(name, server.method(...)) or call(name, server, method)")
        overrides = DeploymentOverrides.model_validate(deployment) if deployment else None
        return self._add(
            CallNode(
                name=name,
                server=server,
                method=method,
                deployment=overrides,
                stream=stream,
                **_wire(ports),
                **options,
            )
        )

    def function(self, name: str, fn: Any, **ports: Any) -> Ref:
        """Run `fn(**ports)`; `fn` must be importable (module level)."""
        options, ports = _split_options(ports)
        return self._add(
            FunctionNode(name=name, function=import_path(fn), **_wire(ports), **options)
        )

    def switch(
        self,
        name: str,
        on: Any,
        cases: dict[str, Pipeline],
        *,
        default: Pipeline | None = None,
        **ports: Any,
    ) -> Ref:
        """Route to the case whose key equals `str(on)`; each case gets `ports` as input."""
        options, ports = _split_options(ports)
        return self._add(
            SwitchNode(
                name=name,
                on=_path(on, name),
                cases={key: case.build() for key, case in cases.items()},
                default=default.build() if default else None,
                **_wire(ports),
                **options,
            )
        )

    def parallel(
        self, name: str, branches: dict[str, Pipeline], *, join: Any = None, **ports: Any
    ) -> Ref:
        """Run every branch concurrently on `ports`; `join(**outputs)` combines them."""
        options, ports = _split_options(ports)
        return self._add(
            ParallelNode(
                name=name,
                branches={k: b.build() for k, b in branches.items()},
                join=import_path(join) if join else None,
                **_wire(ports),
                **options,
            )
        )

    def loop(
        self, name: str, body: Pipeline, *, until: Any, max_iterations: int, **ports: Any
    ) -> Ref:
        """Run `body` on `ports`, then on its own output, until `until(state)` is true."""
        options, ports = _split_options(ports)
        return self._add(
            LoopNode(
                name=name,
                body=body.build(),
                until=import_path(until),
                max_iterations=max_iterations,
                **_wire(ports),
                **options,
            )
        )

    def approval(
        self,
        name: str,
        action: Bound[Any],
        /,
        *,
        summary: Any,
        scope: str | None = None,
        expires_s: float | None = None,
        editable: list[str] | None = None,
        timeout_s: float | None = None,
    ) -> Decision:
        """Stop the run until a person approves or rejects `action` (a typed write,
        ``records.refund_order(text=..., email=...)``), reading `summary` (a ref to
        text); the output is the `Decision` (statically; a `Ref` when built). Only the
        `editable` fields of the action may be changed by the person approving."""
        from servegraph.lang.calls import Bound

        if not isinstance(action, Bound):
            raise TypeError(f"{name}: the action is a typed call, server.method(...)")
        node = ApprovalNode(
            name=name,
            server=action.server,
            method=action.method,
            summary=_path(summary, f"{name}.summary"),
            scope=scope,
            expires_s=expires_s,
            editable=list(editable or []),
            timeout_s=timeout_s,
            **_wire(dict(action.ports)),
        )
        return self._add(node)  # type: ignore[return-value]  # a Ref, typed as its value

    def returns(self, ref: Any = None, **fields: Any) -> None:
        """Declare the output: one ref, or output-model fields from refs (a typed call's
        output is one: statically its response, a `Ref` when the graph is built)."""
        if ref is not None and fields:
            raise ValueError("returns() takes one ref or field=ref pairs, not both")
        self._returns = (
            _path(ref, "returns")
            if ref is not None
            else {k: _path(v, f"returns.{k}") for k, v in fields.items()}
        )

    def build(self) -> Graph:
        """The `Graph` spec (not yet validated: see `servegraph.validate`)."""
        return Graph(
            name=self.name,
            version=self.version,
            signals=self.signals,
            description=self._description,
            input=import_path(self._input_type),
            output=import_path(self._output_type),
            nodes=list(self._nodes),
            returns=self._returns if self._returns is not None else {},
            deadline_s=self.deadline_s,
            max_in_flight=self.max_in_flight,
            cache=self.cache,
        )

    def _add(self, node: Any) -> Ref:
        self._nodes.append(node)
        return Ref(node.name)


_OPTION_NAMES = ("timeout_s", "retries", "idempotent", "fallback")


def _path(ref: Any, where: str) -> str:
    if not isinstance(ref, Ref):
        raise TypeError(f"{where}: expected a reference to a value in the graph, got {ref!r}")
    return ref.path


def _split_options(ports: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    options = {k: ports.pop(k) for k in _OPTION_NAMES if k in ports}
    fallback = options.get("fallback")
    if fallback is not None and not isinstance(fallback, FallbackSpec):
        from servegraph.lang.calls import Method

        if isinstance(fallback, Method):  # a typed server method: `fallback=llm.chat`
            options["fallback"] = FallbackSpec(server=fallback.server, method=fallback.name)
        elif isinstance(fallback, tuple):
            options["fallback"] = FallbackSpec(server=fallback[0], method=fallback[1])
        else:
            options["fallback"] = FallbackSpec(function=import_path(fallback))
    return options, ports


def _wire(ports: dict[str, Any]) -> dict[str, dict[str, Any]]:
    inputs = {k: v.path for k, v in ports.items() if isinstance(v, Ref)}
    params = {k: v for k, v in ports.items() if not isinstance(v, Ref)}
    return {"inputs": inputs, "params": params}
