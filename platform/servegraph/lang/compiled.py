"""The compile step: a graph checked once and bound, ready to run many times.

    graph = build_pipeline().build()          # data: nodes, refs, import paths
    compiled = servegraph.compile(graph, catalog)   # validated, imports resolved
    await runtime.run(compiled, request)       # no validation or import on the way

`compile` validates (every problem at once, as `validate` does) and resolves what the
graph names by import path: its input and output types, every function, join and
loop condition, and fallback function, and each node's dependencies; sub-graphs are
compiled with it. The ingress and the gateways compile their graphs when they start;
`Runtime.run` compiles a plain `Graph` it is given on each call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from servegraph.lang.catalog import Catalog
from servegraph.lang.graph import INPUT, Graph, resolve
from servegraph.lang.validation import validate


@dataclass(frozen=True, eq=False)
class CompiledGraph:
    graph: Graph
    input: type[Any]
    output: Any
    waits_on: Mapping[str, frozenset[str]]
    """Node name -> the nodes whose outputs it reads."""
    functions: Mapping[str, Callable[..., Any]]
    """`<node>` (a function node), `<node>.join`, `<node>.until`, `<node>.fallback`."""
    subgraphs: Mapping[int, CompiledGraph]
    """Compiled sub-graphs by the id of their `Graph`, which `graph` keeps alive."""

    @property
    def name(self) -> str:
        return self.graph.name

    def sub(self, graph: Graph) -> CompiledGraph:
        """The compiled form of one of this graph's sub-graphs (a case, branch, body)."""
        return self.subgraphs[id(graph)]


def compile(graph: Graph, catalog: Catalog) -> CompiledGraph:
    """Validate `graph` against `catalog` and bind it.

    Raises:
        GraphValidationError: every problem found, each with node, port and fix.
    """
    validate(graph, catalog)
    return _bind(graph)


def _bind(graph: Graph) -> CompiledGraph:
    functions: dict[str, Callable[..., Any]] = {
        key: resolve(path) for node in graph.nodes for key, path in node.imports().items()
    }
    return CompiledGraph(
        graph=graph,
        input=resolve(graph.input),
        output=resolve(graph.output),
        waits_on={n.name: frozenset(n.dependencies() - {INPUT}) for n in graph.nodes},
        functions=functions,
        subgraphs={id(sub): _bind(sub) for n in graph.nodes for _, sub in n.children()},
    )
