"""Pictures of a graph: Mermaid for the browser, an indented tree for the terminal."""

from __future__ import annotations

from typing import assert_never

from servegraph.graph import (
    INPUT,
    CallNode,
    FunctionNode,
    Graph,
    LoopNode,
    Node,
    ParallelNode,
    SwitchNode,
)
from servegraph.validation import dependencies, returns_refs


def to_mermaid(graph: Graph) -> str:
    """A Mermaid flowchart: one box per node with its kind and model server."""
    lines = ["flowchart TD"]
    _mermaid(graph, "", lines, "  ")
    return "\n".join(lines)


def to_text(graph: Graph) -> str:
    """An indented listing of nodes with their inputs, for the terminal."""
    lines = [f"{graph.name}: {graph.input.split(':')[-1]} -> {graph.output.split(':')[-1]}"]
    _text(graph, lines, "  ")
    return "\n".join(lines)


def label(node: Node) -> str:
    if isinstance(node, CallNode):
        return f"call {node.server}.{node.method}"
    if isinstance(node, FunctionNode):
        return f"function {node.function.split(':')[-1]}"
    if isinstance(node, SwitchNode):
        return f"switch on {node.on}"
    if isinstance(node, ParallelNode):
        return f"parallel x{len(node.branches)}"
    if isinstance(node, LoopNode):
        return f"loop ≤{node.max_iterations}"
    assert_never(node)


def _mermaid(graph: Graph, prefix: str, lines: list[str], indent: str) -> None:
    def nid(name: str) -> str:
        return f"{prefix}{name}".replace("/", "_").replace("[", "_").replace("]", "_")

    lines.append(f'{indent}{nid(INPUT)}(["{graph.name} input"])')
    for node in graph.nodes:
        if isinstance(node, SwitchNode | ParallelNode | LoopNode):
            lines.append(f'{indent}subgraph {nid(node.name)}["{node.name}: {label(node)}"]')
            for key, sub in node.children():
                _mermaid(sub, f"{prefix}{node.name}__{key}__", lines, indent + "  ")
            lines.append(f"{indent}end")
        else:
            lines.append(f'{indent}{nid(node.name)}["{node.name}<br/><i>{label(node)}</i>"]')
        for dep in sorted(dependencies(node)):
            lines.append(f"{indent}{nid(dep)} --> {nid(node.name)}")
    lines.append(f'{indent}{nid("output")}(["{graph.name} output"])')
    for head in sorted({r.split(".", 1)[0] for r in returns_refs(graph)}):
        lines.append(f"{indent}{nid(head)} --> {nid('output')}")


def _text(graph: Graph, lines: list[str], indent: str) -> None:
    for node in graph.nodes:
        wiring = ", ".join(f"{k}={v}" for k, v in {**node.inputs, **node.params}.items())
        lines.append(f"{indent}{node.name} [{label(node)}]({wiring})")
        for key, sub in node.children():
            lines.append(f"{indent}  {key}:")
            _text(sub, lines, indent + "    ")
    lines.append(f"{indent}returns {graph.returns}")
