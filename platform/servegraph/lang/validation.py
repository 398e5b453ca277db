"""Validate a graph as a whole before anything runs.

`validate` collects every problem (not just the first) and raises one
`GraphValidationError` listing them, each naming the node, the port and the fix.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, assert_never

from pydantic import BaseModel, TypeAdapter, ValidationError

from servegraph.errors import CatalogError, GraphValidationError, Problem
from servegraph.lang._types import compatible, describe, field_type, function_ports, model_ports
from servegraph.lang.catalog import Catalog
from servegraph.lang.graph import (
    INPUT,
    AnswerCache,
    ApprovalNode,
    CallNode,
    Decision,
    FunctionNode,
    Graph,
    LoopNode,
    Node,
    ParallelNode,
    SwitchNode,
    resolve,
    signal_names,
)

Ports = dict[str, tuple[Any, bool]]


def validate(graph: Graph, catalog: Catalog) -> Graph:
    """Check `graph` against `catalog`; return it unchanged or raise.

    Raises:
        GraphValidationError: with every problem found.
    """
    problems = check(graph, catalog)
    if problems:
        raise GraphValidationError(graph.name, problems)
    return graph


def check(graph: Graph, catalog: Catalog, prefix: str = "") -> list[Problem]:
    """Every problem in `graph` (and its sub-graphs); empty when it is valid."""
    return _Checker(graph, catalog, prefix).run()


class _Checker:
    def __init__(self, graph: Graph, catalog: Catalog, prefix: str) -> None:
        self.graph = graph
        self.catalog = catalog
        self.prefix = prefix
        self.problems: list[Problem] = []
        self.names = [n.name for n in graph.nodes]

    def run(self) -> list[Problem]:
        input_type = self._import(self.graph.input, "input", "input type", model=True)
        output_type = self._import(self.graph.output, "output", "output type")
        if self.graph.signals is not None:
            signals = self._import(self.graph.signals, "signals", "answer-signals function")
            if signals is not None and not callable(signals):
                self._problem(
                    "signals",
                    f"{self.graph.signals!r} is not callable",
                    "name a function from the output to {signal: number}",
                )
            elif signals is not None and signal_names(signals) is None:
                self._problem(
                    "signals",
                    f"{self.graph.signals!r} does not declare its signals",
                    "annotate its return with a TypedDict naming each signal (a "
                    "rollout's gates are checked against those names)",
                )
        if self.graph.cache is not None:
            self._check_cache(self.graph.cache, input_type, output_type)
        self._check_names()
        known = set(self.names) | {INPUT}
        types: dict[str, Any] = {INPUT: input_type or Any}
        ports: dict[str, Ports] = {}
        for node in self.graph.nodes:
            types[node.name], ports[node.name] = self._node_contract(node)
        for node in self.graph.nodes:
            self._check_wiring(node, ports[node.name], types, known)
            self._check_options(node)
        self._check_returns(types, known, output_type)
        self._check_cycles()
        self._check_reachable()
        return self.problems

    def _check_cache(self, cache: AnswerCache, input_type: Any, output_type: Any) -> None:
        """The question is a text field of the input, the sources a list of objects'
        ids in the output, the embedder and the store servers the catalog has."""
        fields = getattr(input_type, "model_fields", {})
        if cache.question not in fields or fields[cache.question].annotation is not str:
            self._problem(
                "cache",
                f"the question field {cache.question!r} is not a str field of the input",
                f"name one of the input's text fields: {sorted(fields)}",
                "question",
            )
        listed, _, key = cache.sources.partition(".")
        outputs = getattr(output_type, "model_fields", {})
        items = typing.get_args(outputs[listed].annotation) if listed in outputs else ()
        if not key or len(items) != 1 or key not in getattr(items[0], "model_fields", {}):
            self._problem(
                "cache",
                f"sources {cache.sources!r} is not '<list field>.<id field>' of the output",
                "name the output's list of what the answer was built from, and their id "
                "field (rag: 'passages.id')",
                "sources",
            )
        server, _, method = cache.embed.partition(".")
        try:
            embed = self.catalog.contract(server, method)
        except CatalogError as exc:
            self._problem("cache", str(exc), "name a server and method from the catalog", "embed")
        else:
            if "text" not in embed.request.model_fields or (
                "vector" not in embed.response.model_fields
            ):
                self._problem(
                    "cache",
                    f"{cache.embed} does not take `text` and answer a `vector`",
                    "name a method embedding one text, as embedder.embed_one",
                    "embed",
                )
        for wanted in ("answers_get", "answers_put"):
            try:
                kept = self.catalog.contract(cache.store, wanted)
            except CatalogError as exc:
                fix = "name the server keeping the answers (vector_index)"
                self._problem("cache", str(exc), fix, "store")
                continue
            if kept.tenant_field is None:
                self._problem(
                    "cache",
                    f"{cache.store}.{wanted} takes no tenant: tenants would share answers",
                    "keep answers in a server whose answers methods name a tenant_field",
                    "store",
                )
        for call in self.graph.calls():
            try:
                contract = self.catalog.contract(call.server, call.method)
            except CatalogError:
                continue  # named by the node's own problem
            if contract.writes:
                self._problem(
                    "cache",
                    f"node {call.name!r} writes ({call.server}.{call.method}): a cached "
                    "answer would skip the write",
                    "cache only pipelines that read; remove `cache`",
                    "cache",
                )
                break
        if cache.cacheable is not None:
            check = self._import(cache.cacheable, "cache", "cacheable function")
            if check is not None and not callable(check):
                self._problem(
                    "cache", f"{cache.cacheable!r} is not callable", "name a function", "cacheable"
                )

    # -- helpers ---------------------------------------------------------------

    def _problem(self, node: str, message: str, fix: str, port: str | None = None) -> None:
        self.problems.append(Problem(f"{self.prefix}{node}", message, fix, port))

    def _import(self, path: str, node: str, what: str, *, model: bool = False) -> Any:
        try:
            obj = resolve(path)
        except (ImportError, AttributeError, ValueError) as exc:
            self._problem(
                node,
                f"cannot import {what} {path!r} ({exc})",
                "use 'package.module:name' of a module-level object",
            )
            return None
        if model and not (isinstance(obj, type) and issubclass(obj, BaseModel)):
            self._problem(
                node,
                f"{what} {path!r} is not a pydantic model",
                "declare the input as a pydantic BaseModel subclass",
            )
            return None
        return obj

    def _check_names(self) -> None:
        seen: set[str] = set()
        for name in self.names:
            if name == INPUT:
                self._problem(name, "'input' is reserved for the request", "rename the node")
            elif name in seen:
                self._problem(name, "duplicate node name", "give each node a unique name")
            seen.add(name)

    # -- per node --------------------------------------------------------------

    def _node_contract(self, node: Node) -> tuple[Any, Ports]:
        """(output type, input ports) of a node, checking what it refers to."""
        if isinstance(node, CallNode):
            try:
                contract = self.catalog.contract(node.server, node.method)
            except CatalogError as exc:
                self._problem(node.name, str(exc), "name a server and method from the catalog")
                return Any, {}
            self._platforms_tenant(node, contract)
            if node.stream and contract.stream_method is None:
                self._problem(
                    node.name,
                    f"{node.server}.{node.method} cannot stream",
                    "remove stream=True, or call a method whose contract has a stream_method",
                )
            return contract.response, model_ports(contract.request)
        if isinstance(node, FunctionNode):
            fn = self._import(node.function, node.name, "function")
            if fn is None or not callable(fn):
                return Any, {}
            ports, returns = function_ports(fn)
            return returns, ports
        if isinstance(node, SwitchNode):
            return self._switch_contract(node)
        if isinstance(node, ParallelNode):
            return self._parallel_contract(node)
        if isinstance(node, LoopNode):
            return self._loop_contract(node)
        if isinstance(node, ApprovalNode):
            return self._approval_contract(node)
        assert_never(node)  # a new node kind must say what it takes and gives

    def _platforms_tenant(self, node: CallNode | ApprovalNode, contract: Any) -> None:
        """A call may not wire its contract's `tenant_field`: the run sets it from the
        request's key (`servegraph.tenants`), over anything wired."""
        name = contract.tenant_field
        if name is not None and (name in node.inputs or name in node.params):
            self._problem(
                node.name,
                f"{node.server}.{node.method}'s {name!r} is set by the platform, to the "
                "tenant of the request's key",
                f"remove {name!r} from the call; an admin key acts for another tenant with "
                "the X-Servegraph-Tenant header",
                name,
            )

    def _approval_contract(self, node: ApprovalNode) -> tuple[Any, Ports]:
        """An approval's action is a write applied once per key (the run's, for this
        node): a `writes` method with an `idempotency_field`; its ports are the action
        request's fields. The summary the person reads is text."""
        try:
            contract = self.catalog.contract(node.server, node.method)
        except CatalogError as exc:
            self._problem(node.name, str(exc), "name a server and method from the catalog")
            return Decision, {}
        if not (contract.writes and contract.idempotency_field):
            self._problem(
                node.name,
                f"{node.server}.{node.method} is not a write applied once per key",
                "approve a method whose contract has writes=True and an idempotency_field",
            )
        self._platforms_tenant(node, contract)
        for name in node.editable:
            if name not in contract.request.model_fields or name in (
                contract.idempotency_field,
                contract.tenant_field,
            ):
                self._problem(
                    node.name,
                    f"{name!r} is not an editable field of {contract.request.__name__}",
                    f"name fields of the action's request: {sorted(contract.request.model_fields)}",
                    "editable",
                )
        return Decision, model_ports(contract.request)

    def _subgraph(self, node: Node, label: str, graph: Graph) -> tuple[Any, Ports]:
        self.problems += check(graph, self.catalog, f"{self.prefix}{node.name}/{label}/")
        try:
            input_model, output = resolve(graph.input), resolve(graph.output)
        except (ImportError, AttributeError, ValueError):
            return Any, {}
        ports = (
            model_ports(input_model)
            if isinstance(input_model, type) and issubclass(input_model, BaseModel)
            else {}
        )
        return output, ports

    def _switch_contract(self, node: SwitchNode) -> tuple[Any, Ports]:
        branches = {f"case[{k}]": g for k, g in node.cases.items()}
        if node.default is not None:
            branches["default"] = node.default
        if not node.cases:
            self._problem(node.name, "switch has no cases", "add at least one case")
        return self._same_shape(node, branches)

    def _parallel_contract(self, node: ParallelNode) -> tuple[Any, Ports]:
        if not node.branches:
            self._problem(node.name, "parallel has no branches", "add at least one branch")
        ports: Ports = {}
        outputs: dict[str, Any] = {}
        for key, graph in node.branches.items():
            outputs[key], branch_ports = self._subgraph(node, f"branch[{key}]", graph)
            ports.update(branch_ports)
        if node.join is None:
            return dict[str, Any], ports
        join = self._import(node.join, node.name, "join function")
        if join is None:
            return Any, ports
        join_ports, returns = function_ports(join)
        for key in set(join_ports) - set(outputs):
            self._problem(
                node.name,
                f"join parameter {key!r} is not a branch",
                f"name join parameters after branches {sorted(outputs)}",
                "join",
            )
        for key in set(outputs) - set(join_ports):
            self._problem(
                node.name,
                f"branch {key!r} has no join parameter",
                f"add a parameter {key!r} to the join function",
                "join",
            )
        return returns, ports

    def _loop_contract(self, node: LoopNode) -> tuple[Any, Ports]:
        output, ports = self._subgraph(node, "body", node.body)
        until = self._import(node.until, node.name, "until function")
        if until is not None and len(inspect.signature(until).parameters) != 1:
            self._problem(
                node.name,
                "until must take exactly one argument (the state)",
                "define until(state) -> bool",
                "until",
            )
        try:
            body_input = resolve(node.body.input)
        except (ImportError, AttributeError, ValueError):
            body_input = Any
        if not compatible(output, body_input):
            self._problem(
                node.name,
                f"loop body returns {describe(output)} but takes {describe(body_input)}",
                "make the body's output type its input type (the state is fed back)",
                "body",
            )
        return output, ports

    def _same_shape(self, node: Node, branches: dict[str, Graph]) -> tuple[Any, Ports]:
        ports: Ports = {}
        outputs = []
        for label, graph in branches.items():
            output, branch_ports = self._subgraph(node, label, graph)
            outputs.append((label, output))
            ports.update(branch_ports)
        if outputs and any(out != outputs[0][1] for _, out in outputs):
            kinds = ", ".join(f"{label}: {describe(out)}" for label, out in outputs)
            self._problem(
                node.name,
                f"branches return different types ({kinds})",
                "make every branch return the same output type",
            )
            return Any, ports
        return (outputs[0][1] if outputs else Any), ports

    def _check_wiring(
        self, node: Node, ports: Ports, types: dict[str, Any], known: set[str]
    ) -> None:
        for port in set(node.inputs) & set(node.params):
            self._problem(
                node.name, "port is both wired and given a constant", "keep one of them", port
            )
        for port, ref in node.inputs.items():
            source = self._ref_type(node.name, port, ref, types, known)
            if ports and port not in ports:
                self._unknown_port(node, port, ports)
            elif ports and source is not None and not compatible(source, ports[port][0]):
                self._problem(
                    node.name,
                    f"type mismatch: {ref!r} is {describe(source)}, "
                    f"port expects {describe(ports[port][0])}",
                    "wire a value of the expected type, or convert it in a function node",
                    port,
                )
        for port, value in node.params.items():
            if ports and port not in ports:
                self._unknown_port(node, port, ports)
            elif ports:
                try:
                    TypeAdapter(ports[port][0]).validate_python(value)
                except ValidationError as exc:
                    self._problem(
                        node.name,
                        f"constant {value!r} is not a valid "
                        f"{describe(ports[port][0])}: {exc.errors()[0]['msg']}",
                        "pass a constant of the port's type",
                        port,
                    )
        for port, (tp, required) in ports.items():
            if required and port not in node.inputs and port not in node.params:
                self._problem(
                    node.name,
                    f"required input of type {describe(tp)} is not connected",
                    f"wire it ({port}=<ref>) or give it a constant",
                    port,
                )
        if isinstance(node, SwitchNode):
            self._ref_type(node.name, "on", node.on, types, known)
        if isinstance(node, ApprovalNode):
            summary = self._ref_type(node.name, "summary", node.summary, types, known)
            if summary is not None and not compatible(summary, str):
                self._problem(
                    node.name,
                    f"the summary {node.summary!r} is {describe(summary)}, not text",
                    "wire a str (write it in a function node)",
                    "summary",
                )

    def _unknown_port(self, node: Node, port: str, ports: Ports) -> None:
        self._problem(node.name, "no such input port", f"use one of {sorted(ports)}", port)

    def _ref_type(
        self, node: str, port: str, ref: str, types: dict[str, Any], known: set[str]
    ) -> Any:
        head, *fields = ref.split(".")
        if head not in known:
            self._problem(
                node,
                f"ref {ref!r} names unknown node {head!r}",
                f"refer to 'input' or one of {sorted(known - {INPUT})}",
                port,
            )
            return None
        tp = types.get(head, Any)
        for i, field in enumerate(fields):
            ok, tp = field_type(tp, field)
            if not ok:
                where = ".".join([head, *fields[:i]])
                self._problem(
                    node,
                    f"ref {ref!r}: {where} has no field {field!r}",
                    "refer to a field that exists",
                    port,
                )
                return None
        return tp

    def _check_options(self, node: Node) -> None:
        if node.retries and not node.idempotent:
            self._problem(
                node.name,
                f"retries={node.retries} on a node not declared idempotent",
                "set idempotent=True if a repeat is safe, or drop retries",
            )
        fallback = node.fallback
        if fallback is None:
            return
        if fallback.function:
            self._import(fallback.function, node.name, "fallback function")
        elif fallback.server and fallback.method:
            try:
                self.catalog.contract(fallback.server, fallback.method)
            except CatalogError as exc:
                self._problem(node.name, f"fallback: {exc}", "name a known server and method")
        else:
            self._problem(
                node.name,
                "fallback names neither a function nor a server method",
                "give fallback=function or fallback=(server, method)",
            )

    # -- whole graph -----------------------------------------------------------

    def _check_returns(self, types: dict[str, Any], known: set[str], output: Any) -> None:
        returns = self.graph.returns
        if not returns:
            self._problem(
                "returns",
                "the graph declares no output",
                "call returns(ref) or returns(field=ref, ...)",
            )
            return
        if isinstance(returns, str):
            source = self._ref_type("returns", "returns", returns, types, known)
            if output is not None and source is not None and not compatible(source, output):
                self._problem(
                    "returns",
                    f"returns {describe(source)} but the pipeline declares {describe(output)}",
                    "return a value of the output type",
                )
            return
        if not (isinstance(output, type) and issubclass(output, BaseModel)):
            self._problem(
                "returns",
                "field mapping needs a pydantic output model",
                "declare output=<BaseModel subclass> or return one ref",
            )
            return
        fields = model_ports(output)
        for name, ref in returns.items():
            source = self._ref_type("returns", name, ref, types, known)
            if name not in fields:
                self._problem(
                    "returns",
                    f"output {output.__name__} has no field {name!r}",
                    f"use one of {sorted(fields)}",
                    name,
                )
            elif source is not None and not compatible(source, fields[name][0]):
                self._problem(
                    "returns",
                    f"type mismatch: {ref!r} is {describe(source)}, "
                    f"field expects {describe(fields[name][0])}",
                    "return a value of the field's type",
                    name,
                )
        for name, (_, required) in fields.items():
            if required and name not in returns:
                self._problem(
                    "returns",
                    "required output field is not set",
                    f"add {name}=<ref> to returns()",
                    name,
                )

    def _check_cycles(self) -> None:
        graph = {n.name: n.dependencies() & set(self.names) for n in self.graph.nodes}
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for dep in sorted(graph.get(name, ())):
                if state.get(dep) == 1:
                    cycle = [*path[path.index(dep) :], dep] if dep in path else [name, dep]
                    self._problem(
                        dep,
                        f"cycle: {' -> '.join(cycle)}",
                        "break the cycle, or declare the repetition as a loop node",
                    )
                elif dep not in state:
                    visit(dep, [*path, dep])
            state[name] = 2

        for name in graph:
            if name not in state:
                visit(name, [name])

    def _check_reachable(self) -> None:
        by_name = {n.name: n for n in self.graph.nodes}
        needed: set[str] = set()
        frontier = [r.split(".", 1)[0] for r in self.graph.returns_refs()]
        while frontier:
            name = frontier.pop()
            if name in needed or name not in by_name:
                continue
            needed.add(name)
            frontier.extend(by_name[name].dependencies())
        for name in self.names:
            if name not in needed:
                self._problem(
                    name,
                    "node does not contribute to the output (unreachable)",
                    "wire its output into a node on the path to returns, or remove it",
                )
