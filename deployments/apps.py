"""Serve application builders, one per model server: `name_app(args) -> Application`.

Each application is the server's gateway (its REST surface, `servegraph.gateway`) in
front of its model deployment, which pipelines call by handle.

Serve calls a builder with the `args` of its config entry; here those are deployment
option overrides (replicas, autoscaling, resources) on top of the configured profile,
and constructor arguments.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from deployments.profiles import options_for
from deployments.settings import ModelSettings
from servegraph.gateway import gateway_app


class ServerAppArgs(BaseModel):
    overrides: dict[str, Any] | None = Field(None, description="Serve deployment options.")
    init: dict[str, Any] = Field(default_factory=dict, description="Constructor kwargs.")


def _args(args: ServerAppArgs | dict[str, Any] | None) -> ServerAppArgs:
    return ServerAppArgs.model_validate(args or {})


def embedder_app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    overrides, init = _args(args).overrides, dict(_args(args).init)
    from deployments.embedder import Embedder

    settings = ModelSettings()
    options = options_for("embedder", settings.profile, overrides)
    return gateway_app(
        "embedder",
        Embedder.options(**options).bind(str(settings.embedder_dir), **init),  # type: ignore[attr-defined]  # a @serve.deployment class is a Deployment
    )


def classifier_app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    overrides, init = _args(args).overrides, dict(_args(args).init)
    from deployments.classifier import Classifier

    settings = ModelSettings()
    options = options_for("classifier", settings.profile, overrides)
    return gateway_app(
        "classifier",
        Classifier.options(**options).bind(  # type: ignore[attr-defined]  # a @serve.deployment class is a Deployment
            str(settings.classifier_dir), str(settings.embedder_dir), **init
        ),
    )


def vector_index_app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    overrides, init = _args(args).overrides, dict(_args(args).init)
    from deployments.vector_index import VectorIndex

    settings = ModelSettings()
    options = options_for("vector_index", settings.profile, overrides)
    if options.get("num_replicas", 1) != 1 or "autoscaling_config" in options:
        raise ValueError("vector_index runs exactly one replica (see deployments/vector_index.py)")
    init.setdefault("path", str(settings.index_dir))
    deployment = VectorIndex.options(**options)  # type: ignore[attr-defined]  # a @serve.deployment class is a Deployment
    return gateway_app("vector_index", deployment.bind(**init))


def llm_app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    from deployments.llm import build

    return build(_args(args).overrides)


def llm_deployment_name() -> str:
    from deployments.llm import deployment_name

    return deployment_name(ModelSettings().llm_model_id)
