"""Graphs to YAML and back. Python objects are referred to by import path."""

from __future__ import annotations

from pathlib import Path

import yaml

from servegraph.lang.graph import Graph


def to_yaml(graph: Graph) -> str:
    """The graph as YAML; `from_yaml(to_yaml(g)) == g`."""
    data = graph.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def from_yaml(text: str) -> Graph:
    """Parse a graph from YAML text (not validated: see `servegraph.validate`)."""
    return Graph.model_validate(yaml.safe_load(text))


def load_yaml(path: str | Path) -> Graph:
    return from_yaml(Path(path).read_text())
