"""Pictures of a graph: Mermaid for the browser, an indented tree for the terminal."""

from __future__ import annotations

from servegraph.lang.graph import (
    INPUT,
    Graph,
)


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


def _mermaid(graph: Graph, prefix: str, lines: list[str], indent: str) -> None:
    def nid(name: str) -> str:
        return f"{prefix}{name}".replace("/", "_").replace("[", "_").replace("]", "_")

    lines.append(f'{indent}{nid(INPUT)}(["{graph.name} input"])')
    for node in graph.nodes:
        if node.children():
            lines.append(f'{indent}subgraph {nid(node.name)}["{node.name}: {node.describe()}"]')
            for key, sub in node.children():
                _mermaid(sub, f"{prefix}{node.name}__{key}__", lines, indent + "  ")
            lines.append(f"{indent}end")
        else:
            lines.append(f'{indent}{nid(node.name)}["{node.name}<br/><i>{node.describe()}</i>"]')
        for dep in sorted(node.dependencies()):
            lines.append(f"{indent}{nid(dep)} --> {nid(node.name)}")
    lines.append(f'{indent}{nid("output")}(["{graph.name} output"])')
    for head in sorted({r.split(".", 1)[0] for r in graph.returns_refs()}):
        lines.append(f"{indent}{nid(head)} --> {nid('output')}")


def _text(graph: Graph, lines: list[str], indent: str) -> None:
    for node in graph.nodes:
        wiring = ", ".join(f"{k}={v}" for k, v in {**node.inputs, **node.params}.items())
        lines.append(f"{indent}{node.name} [{node.describe()}]({wiring})")
        for key, sub in node.children():
            lines.append(f"{indent}  {key}:")
            _text(sub, lines, indent + "    ")
    lines.append(f"{indent}returns {graph.returns}")
