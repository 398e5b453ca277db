"""Find pipelines: every module in a package that defines `build_pipeline()` or
`PIPELINE`, and every ``*.yaml`` graph file beside them."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from servegraph.lang.graph import Graph, Pipeline
from servegraph.lang.serialize import load_yaml
from servegraph.settings import AppSettings


def discover(package: str | None = None) -> dict[str, Graph]:
    """Pipeline name -> graph, for every pipeline defined under `package` (by default
    the configured one, `AppSettings().pipelines`).

    Raises:
        ValueError: two pipelines share a name.
    """
    package = package or AppSettings().pipelines
    root = importlib.import_module(package)
    graphs: dict[str, Graph] = {}
    for info in sorted(
        pkgutil.walk_packages(root.__path__, prefix=f"{package}."), key=lambda i: i.name
    ):
        module = importlib.import_module(info.name)
        found = getattr(module, "PIPELINE", None)
        if hasattr(module, "build_pipeline"):
            found = module.build_pipeline()
        if found is not None:
            _add(graphs, found.build() if isinstance(found, Pipeline) else found, info.name)
    for folder in map(Path, root.__path__):
        for path in sorted(folder.rglob("*.graph.yaml")):
            _add(graphs, load_yaml(path), str(path))
    return graphs


def _add(graphs: dict[str, Graph], graph: Graph, where: str) -> None:
    if graph.name in graphs:
        raise ValueError(f"two pipelines are named {graph.name!r} (second in {where}); rename one")
    graphs[graph.name] = graph
