"""A pipeline's graph drawn as SVG, by Graphviz's `dot` (Debian's `graphviz`, installed
by the project's set-up; nothing is downloaded, and the page needs no script to lay it
out).

Every node of the graph is one drawn node, its id "node:<drawn name>": the node's name,
inside a switch, parallel or loop node prefixed by that node's name and the case,
branch or "body" (`servegraph.console.recent.drawn_name` maps a request's node records
onto these). A switch, parallel or loop node is a box (a Graphviz cluster) holding its
sub-graphs, each with its own input and output, and a header node the edges into the
box reach. A loop's body has an edge from its output back to its input. Each edge's id
is "edge:<from>-><to>". Each node's class is its kind. Each node but the inputs and
outputs has two more lines, and a call node a third, that the page fills with its live
figures (and a call's model server's replicas and queue).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from servegraph.lang.graph import INPUT, Graph, LoopNode, Node

OUTPUT = "output"
# What a figure line is sized for: dot makes each box as wide as its widest line, and
# the page writes the figures into the lines afterwards.
_FIGURE_ROOM = "0000.0/s · p50 0000 ms · p99 0000 ms"
_MORE_ROOM = "err 100% · miss 100% · $0.00e-00"
_SERVER_ROOM = "replicas 000 · queued 0000"  # a call node's model server, now


@dataclass
class Drawing:
    """The graph as drawn: its nodes (drawn name -> kind) and edges, and the DOT text."""

    nodes: dict[str, str] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def dot(self) -> str:
        head = [
            "digraph pipeline {",
            '  graph [rankdir=TB, compound=true, fontname="sans-serif", fontsize=12, '
            'bgcolor="transparent", nodesep=0.3, ranksep=0.35];',
            '  node [shape=box, style="rounded,filled", fillcolor="#f4f6f8", '
            'color="#56606b", fontname="sans-serif", fontsize=11];',
            '  edge [color="#56606b", arrowsize=0.7, fontname="sans-serif", fontsize=10];',
        ]
        return "\n".join([*head, *self.lines, "}"])


def _quote(text: str) -> str:
    """A DOT string: backslashes and quotes escaped, line breaks as DOT's centred ones."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def draw(graph: Graph) -> Drawing:
    """The drawing of `graph` (as DOT, with the nodes and edges it draws)."""
    drawing = Drawing()
    _draw(graph, "", drawing, "  ", loop=False)
    return drawing


def _draw(graph: Graph, prefix: str, drawing: Drawing, indent: str, *, loop: bool) -> None:
    def name(node: str) -> str:
        return f"{prefix}{node}"

    def add_node(drawn: str, kind: str, label: str, *, ends: bool = False) -> None:
        drawing.nodes[drawn] = kind
        attributes = {"id": f"node:{drawn}", "label": label, "tooltip": drawn, "class": kind}
        if ends:
            attributes |= {"shape": "oval", "fillcolor": "#e3e8ee"}
        else:  # lines for the page's figures, as wide as they will be
            lines = [label, _FIGURE_ROOM, _MORE_ROOM, *([_SERVER_ROOM] if kind == "call" else [])]
            attributes["label"] = "\n".join(lines)
        listed = ", ".join(f"{k}={_quote(v)}" for k, v in attributes.items())
        drawing.lines.append(f"{indent}{_quote(drawn)} [{listed}];")

    boxes = {n.name: n.children()[-1][0] for n in graph.nodes if n.children()}

    def add_edge(a: str, b: str, **extra: str) -> None:
        drawing.edges.append((a, b))
        attributes = {"id": f"edge:{a}->{b}", **extra}
        source = a
        box = a.removeprefix(prefix)
        if box in boxes and not b.startswith(f"{a}/"):  # out of a box: from its bottom
            source = f"{a}/{boxes[box]}/{OUTPUT}"
            attributes["ltail"] = f"cluster:{a}"
        listed = ", ".join(f"{k}={_quote(v)}" for k, v in attributes.items())
        drawing.lines.append(f"{indent}{_quote(source)} -> {_quote(b)} [{listed}];")

    title = prefix.rstrip("/").rsplit("/", 1)[-1] if prefix else graph.name
    add_node(name(INPUT), "input", "input" if prefix else f"{title} input", ends=True)
    for node in graph.nodes:
        drawn = name(node.name)
        if node.children():
            cluster = f"cluster:{drawn}"
            drawing.lines.append(f"{indent}subgraph {_quote(cluster)} {{")
            drawing.lines.append(
                f"{indent}  graph [label={_quote(f'{node.name}: {node.describe()}')}, "
                f'id={_quote(cluster)}, style="rounded,dashed", color="#8a96a3"];'
            )
            inner = indent + "  "
            add_node(drawn, node.kind, f"{node.name}\n{node.describe()}")
            for key, sub in node.children():
                _draw(sub, f"{drawn}/{key}/", drawing, inner, loop=isinstance(node, LoopNode))
                add_edge(drawn, f"{drawn}/{key}/{INPUT}", label=key, fontsize="10")
            drawing.lines.append(f"{indent}}}")
        else:
            add_node(drawn, node.kind, f"{node.name}\n{node.describe()}")
        for dep in sorted(node.dependencies()):
            add_edge(name(dep), drawn)
    add_node(name(OUTPUT), "output", "output" if prefix else f"{title} output", ends=True)
    for head in _heads(graph):
        add_edge(name(head), name(OUTPUT))
    if loop:  # the body's output is its next iteration's input
        add_edge(name(OUTPUT), name(INPUT), style="dashed", label="again", constraint="false")


def _heads(graph: Graph) -> list[str]:
    """The nodes (or the input) the graph's output reads."""
    return sorted({ref.split(".", 1)[0] for ref in graph.returns_refs()})


def walk(graph: Graph, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Every node of `graph` and of its sub-graphs, with its drawn name."""
    for node in graph.nodes:
        yield f"{prefix}{node.name}", node
        for key, sub in node.children():
            yield from walk(sub, f"{prefix}{node.name}/{key}/")


class DrawingError(RuntimeError):
    """Graphviz is missing or failed: the page shows the graph's text instead."""


@functools.lru_cache(maxsize=256)
def _svg(dot_source: str) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise DrawingError("Graphviz's `dot` is not installed: run `make install`")
    try:
        done = subprocess.run(
            [dot, "-Tsvg"], input=dot_source, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DrawingError(f"dot did not run: {type(exc).__name__}") from exc
    start = done.stdout.find("<svg")
    if done.returncode != 0 or start < 0:
        raise DrawingError(f"dot failed: {done.stderr.strip()[-500:]}")
    # The XML declaration and DOCTYPE go: the SVG is put inside the page.
    return done.stdout[start:]


def svg(graph: Graph) -> str:
    """`graph` drawn as SVG (laid out once per graph, then from a cache)."""
    return _svg(draw(graph).dot())
