"""The framework's families and what each may import (the README's layout section).

Read from the source with `ast`, so a rule holds for imports inside functions too. A
family is a subpackage of `servegraph` (`lang`, `engine`, `cost`, `serving`, `deploy`,
`security`, `telemetry`, `console`); the leaves (`errors`, `settings`, `tenants`, `_fields`,
`_actors`, `_files`, `_serve_status`) and the entry points (`servegraph` itself, `server`, `cli`,
`offline`) are modules of their own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "platform" / "servegraph"

LEAVES = {"errors", "settings", "tenants", "_fields", "_actors", "_files", "_serve_status"}
ENTRY_POINTS = {"servegraph", "server", "cli", "offline"}
# What each family may import from the framework (its own modules always). The order
# is the layering: the graph language at the bottom, the Serve request path and
# deploying at the top (deploy's planner names the ingress; the ingress reports to
# deploy's scaling board).
MAY_IMPORT: dict[str, set[str]] = {
    "lang": {"errors", "settings"},
    "cost": set(),
    "engine": {"lang", "cost", "errors", "tenants", "_fields"},
    "telemetry": {"cost", "engine", "errors", "settings", "tenants"},
    "security": {"telemetry", "errors", "settings", "tenants", "_actors"},
    "console": {"lang", "engine", "cost", "security", "telemetry", *LEAVES},
    "serving": {"lang", "engine", "cost", "security", "telemetry", "deploy", "console", *LEAVES},
    "deploy": {"lang", "engine", "cost", "security", "telemetry", "serving", *LEAVES},
    "errors": set(),
    "settings": set(),
    "tenants": {"errors"},
    "_fields": set(),
    "_actors": set(),
    "_files": set(),
    "_serve_status": set(),
}
NO_RAY = {"lang", "engine"}  # not even inside a function
RAY_AT_IMPORT = {"serving"}  # the rest import Ray only inside the functions that use it


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _unit(module: str) -> str:
    """The family (or leaf, or entry point) a `servegraph...` module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "servegraph"


def _imports(tree: ast.Module) -> Iterator[tuple[str, bool]]:
    """Every module an import names (`from servegraph import x` names `servegraph.x`
    when x is a module), and whether the import runs when the module is imported
    (module level, not inside a function)."""
    inside_functions: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside_functions.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        at_import = id(node) not in inside_functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, at_import
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "servegraph":
                for alias in node.names:
                    is_module = (PACKAGE / alias.name).is_dir() or (
                        PACKAGE / f"{alias.name}.py"
                    ).exists()
                    yield (f"servegraph.{alias.name}" if is_module else "servegraph"), at_import
            else:
                yield node.module, at_import


def _framework_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _framework_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_framework_module_imports_only_what_its_family_may(path: Path) -> None:
    unit = _unit(_module_name(path))
    if unit in ENTRY_POINTS:
        return  # the entry points assemble the families: they may import any
    allowed = MAY_IMPORT[unit]
    wrong = []
    for imported, at_import in _imports(ast.parse(path.read_text())):
        top = imported.split(".")[0]
        if top == "ray":
            if unit in NO_RAY:
                wrong.append(f"{imported} (the {unit} family imports no Ray)")
            elif at_import and unit not in RAY_AT_IMPORT:
                wrong.append(f"{imported} at import time (import Ray inside the function)")
        elif top == "servegraph":
            target = _unit(imported)
            if target in ENTRY_POINTS:
                wrong.append(f"{imported} (an entry point: families never import those)")
            elif target != unit and target not in allowed:
                wrong.append(f"{imported} ({unit} may import {sorted(allowed) or 'nothing'})")
    assert not wrong, f"{path.relative_to(ROOT)} imports: {wrong}"


def test_every_family_says_what_it_is_and_its_init_imports_nothing() -> None:
    families = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))
    assert {f.name for f in families} >= set(MAY_IMPORT) - LEAVES
    for family in families:
        tree = ast.parse((family / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"{family.name}/__init__.py needs a docstring"
        assert not list(_imports(tree)), (
            f"{family.name}/__init__.py imports: importing one of its modules would load them"
        )


def _servegraph_imports(folder: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(folder.rglob("*.py")):
        for imported, _ in _imports(ast.parse(path.read_text())):
            if imported.split(".")[0] == "servegraph":
                yield path, imported


def test_model_servers_import_only_servegraph_and_servegraph_server() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}: {imported}"
        for path, imported in _servegraph_imports(ROOT / "deployments")
        if imported not in {"servegraph", "servegraph.server"}
    ]
    assert not wrong, f"import these through servegraph.server: {wrong}"


def test_pipelines_import_only_the_graph_language_surface() -> None:
    allowed = {
        "servegraph",
        "servegraph.security.client",  # a client of the REST surface: the local key
    }
    wrong = [
        f"{path.relative_to(ROOT)}: {imported}"
        for path, imported in _servegraph_imports(ROOT / "pipelines")
        if imported not in allowed
    ]
    assert not wrong, f"pipelines use the public surface (`servegraph`): {wrong}"


def test_the_rules_see_a_lazy_import() -> None:
    """The checker itself: an import inside a function is seen, and known as lazy."""
    tree = ast.parse("import os\n\ndef f():\n    from ray import serve\n")
    assert list(_imports(tree)) == [("os", True), ("ray", False)]
