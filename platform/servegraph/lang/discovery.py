"""Find pipelines: every module in a package that defines `build_pipeline()` or
`PIPELINE` (a graph, a `Pipeline`, or a list of them: several versions of one pipeline),
and every ``*.graph.yaml`` graph file beside them.

A pipeline may be served at several versions side by side (`Graph.version`): they share
its name and route, and `servegraph.serving.traffic` says which answers a request. So
that a caller's request fits whichever version answers it, the versions of one pipeline
take the same input and return the same output type.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterable
from pathlib import Path

from servegraph.lang.graph import Graph, Pipeline
from servegraph.lang.serialize import load_yaml
from servegraph.settings import AppSettings


def discover(package: str | None = None) -> dict[str, Graph]:
    """Pipeline name -> the graph of its default version (`default_version`), for every
    pipeline defined under `package` (by default the configured one,
    `AppSettings().pipelines`).

    Raises:
        ValueError: two graphs share a name and a version, or two versions of one
            pipeline take different inputs or return different outputs.
    """
    return {
        name: versions[default_version(versions)]
        for name, versions in discover_versions(package).items()
    }


def discover_versions(package: str | None = None) -> dict[str, dict[str, Graph]]:
    """Pipeline name -> version -> graph, for every pipeline under `package`.

    Raises:
        ValueError: as `discover`.
    """
    package = package or AppSettings().pipelines
    root = importlib.import_module(package)
    found: list[tuple[Graph, str]] = []
    for info in sorted(
        pkgutil.walk_packages(root.__path__, prefix=f"{package}."), key=lambda i: i.name
    ):
        module = importlib.import_module(info.name)
        defined = getattr(module, "PIPELINE", None)
        if hasattr(module, "build_pipeline"):
            defined = module.build_pipeline()
        if defined is not None:
            found += [(graph, info.name) for graph in _graphs(defined)]
    for folder in map(Path, root.__path__):
        for path in sorted(folder.rglob("*.graph.yaml")):
            found.append((load_yaml(path), str(path)))
    return collect(found)


def collect(found: Iterable[tuple[Graph, str]]) -> dict[str, dict[str, Graph]]:
    """Graphs with where each was defined -> name -> version -> graph.

    Raises:
        ValueError: as `discover`, naming both places.
    """
    graphs: dict[str, dict[str, Graph]] = {}
    where: dict[tuple[str, str], str] = {}
    for graph, place in found:
        key = (graph.name, graph.version)
        if key in where:
            raise ValueError(
                f"two graphs are pipeline {graph.name!r} at version {graph.version!r}: "
                f"{where[key]} and {place}; rename one or give it another `version`"
            )
        versions = graphs.setdefault(graph.name, {})
        for other in versions.values():
            if (other.input, other.output) != (graph.input, graph.output):
                raise ValueError(
                    f"pipeline {graph.name!r}: version {graph.version!r} ({place}) takes "
                    f"{graph.input} and returns {graph.output}, version {other.version!r} "
                    f"({where[(other.name, other.version)]}) takes {other.input} and returns "
                    f"{other.output}; the versions of one pipeline share its route, so they "
                    "must take the same input and return the same output"
                )
        where[key] = place
        versions[graph.version] = graph
    return graphs


def default_version(versions: Iterable[str]) -> str:
    """The version that answers when nothing else is said (no traffic split set): the
    oldest, in natural order (v2 before v10). So adding a candidate version serves it
    to nobody until traffic is sent to it."""
    return min(versions, key=version_order)


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", version)
        if part
    )


def _graphs(defined: Graph | Pipeline | list[Graph | Pipeline]) -> list[Graph]:
    items = defined if isinstance(defined, list) else [defined]
    return [item.build() if isinstance(item, Pipeline) else item for item in items]
