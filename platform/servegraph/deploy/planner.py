"""Plan the Ray Serve applications that serve graphs: one application per model server
(shared by every pipeline that calls it) and one ingress application with a route per
pipeline. Planning validates the graphs; it compiles nothing.

`plan_platform` returns a plan; `deploy` runs it on the connected Serve instance, and
`serve_config` writes the same plan as a config file that `serve deploy` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from servegraph.errors import GraphValidationError, Problem
from servegraph.lang.catalog import Catalog
from servegraph.lang.graph import Graph, resolve
from servegraph.lang.serialize import to_yaml
from servegraph.lang.validation import validate
from servegraph.settings import AppSettings


@dataclass(frozen=True)
class AppPlan:
    """One Serve application: what `serve deploy` needs to build it."""

    name: str
    route_prefix: str
    import_path: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlatformPlan:
    apps: list[AppPlan]

    def deploy(self) -> None:
        """Build and start every application on the Serve instance Ray is connected to,
        all in one request to Serve's controller, and return without waiting for their
        replicas (`local_ray.wait_until_running` waits for them).

        `serve.run` waits for its application to be RUNNING even with `blocking=False`,
        so one call per application started them one after the other: the LLM's ~40 s,
        then each encoder's ~10 s, and so on (100 s for the whole platform on this
        2-core machine). `serve.run_many` hands them over together and their replicas
        start side by side (93 s here: on 2 cores the starts share the CPU, and the
        LLM's is the longest; more cores gain more).
        """
        from ray import serve

        serve.run_many(
            [
                serve.RunTarget(
                    resolve(app.import_path)(app.args), name=app.name, route_prefix=app.route_prefix
                )
                for app in self.apps
            ],
            wait_for_applications_running=False,
        )

    def serve_config(
        self, *, host: str = "127.0.0.1", port: int = 8000, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A Serve config (ServeDeploySchema) for `serve deploy`.

        Args:
            env: environment for every application's build and replicas, e.g.
                ``{"SERVEGRAPH_PROFILE": "gpu"}``.

        With tracing on where the config is built (`OTEL_TRACES_EXPORTER`), the config
        carries Serve's `tracing_config`; the exporters' own settings (endpoint,
        headers: maybe a secret) stay in the nodes' environment (cluster.yaml), not in
        a file the dashboard shows.
        """
        from servegraph.telemetry.tracing import serve_tracing_config

        tracing = serve_tracing_config()
        return {
            "proxy_location": "HeadOnly",
            "http_options": {"host": host, "port": port},
            **({"tracing_config": _dump(tracing)} if tracing is not None else {}),
            "applications": [
                {
                    "name": a.name,
                    "route_prefix": a.route_prefix,
                    "import_path": a.import_path,
                    "args": a.args,
                    **({"runtime_env": {"env_vars": dict(env)}} if env else {}),
                }
                for a in self.apps
            ],
        }


def _dump(model: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump() if hasattr(model, "model_dump") else model.dict()
    return dumped


def plan_platform(
    graphs: dict[str, Graph] | list[Graph],
    catalog: Catalog,
    *,
    catalog_path: str | None = None,
    packages: list[str] | None = None,
    all_servers: bool = False,
    ingress_deployment: dict[str, Any] | None = None,
) -> PlatformPlan:
    """Validate `graphs` and plan their Serve applications.

    Args:
        graphs: the pipelines to serve.
        catalog: the model servers they may call.
        catalog_path: import path of `catalog`, for the ingress replica (default: the
            configured one, `AppSettings().catalog`).
        packages: when the graphs came from these packages, the ingress rediscovers
            them there; otherwise each graph travels as YAML in the app's args.
        all_servers: deploy every server in the catalog, not only those called.
        ingress_deployment: Serve options for the ingress deployment.

    Raises:
        GraphValidationError: a graph is invalid, or two pipelines ask one server
            for different deployment options.
    """
    graph_list = list(graphs.values()) if isinstance(graphs, dict) else list(graphs)
    if packages is not None:  # the ingress serves every version found there: plan them all
        from servegraph.lang.discovery import discover_versions

        given = {(g.name, g.version) for g in graph_list}
        names = {name for name, _ in given}
        graph_list += [
            g
            for package in packages
            for name, versions in discover_versions(package).items()
            if name in names
            for g in versions.values()
            if (g.name, g.version) not in given
        ]
    for graph in graph_list:
        validate(graph, catalog)
    overrides = _server_overrides(graph_list)
    used = set(catalog) if all_servers else {node.server for g in graph_list for node in g.calls()}
    apps = [
        AppPlan(
            spec.name,
            spec.route_prefix,
            spec.app_builder,
            {"overrides": overrides[spec.name]} if spec.name in overrides else {},
        )
        for spec in catalog.values()
        if spec.name in used
    ]
    ingress_args: dict[str, Any] = {
        "catalog": catalog_path or AppSettings().catalog,
        "deployment": ingress_deployment or {},
    }
    if packages is not None:
        ingress_args |= {"packages": packages, "names": sorted({g.name for g in graph_list})}
    else:
        ingress_args |= {"packages": [], "graphs_yaml": [to_yaml(g) for g in graph_list]}
    from servegraph.serving.ingress import INGRESS_APP, INGRESS_PREFIX

    apps.append(
        AppPlan(INGRESS_APP, INGRESS_PREFIX, "servegraph.serving.ingress:ingress_app", ingress_args)
    )
    return PlatformPlan(apps)


def _server_overrides(graphs: list[Graph]) -> dict[str, dict[str, Any]]:
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    problems = []
    for graph in graphs:
        for node in graph.calls():
            if node.deployment is None:
                continue
            options = node.deployment.model_dump(exclude_none=True)
            # The version too, when the pipeline has several: both may be "rag.generate".
            several = sum(g.name == graph.name for g in graphs) > 1
            where = f"{graph.name}{f' {graph.version}' if several else ''}.{node.name}"
            if node.server in chosen and chosen[node.server][1] != options:
                problems.append(
                    Problem(
                        where,
                        f"asks {node.server!r} for {options}, but {chosen[node.server][0]} "
                        f"asks for {chosen[node.server][1]}",
                        "give the shared model server one set of deployment options",
                    )
                )
            chosen.setdefault(node.server, (where, options))
    if problems:
        raise GraphValidationError("(deployment options)", problems)
    return {server: options for server, (_, options) in chosen.items()}
