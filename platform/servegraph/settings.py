"""Where the application the framework serves lives, in one place: the catalog of model
servers and the package of pipelines. Read from the environment (`SERVEGRAPH_CATALOG`,
`SERVEGRAPH_PIPELINES`); the CLI's `--catalog` and `--package` override them and pass
them down, so no module of the framework names the application itself."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_", extra="ignore")

    catalog: str = Field(
        "deployments.catalog:CATALOG", description="Import path of the model-server Catalog."
    )
    pipelines: str = Field("pipelines", description="Package whose modules define pipelines.")
    alert_rules: str = Field(
        "dashboards/alerts.yaml", description="Prometheus alert rules `servegraph observe` loads."
    )
    router_resources: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Ray resources every request router asks for (the pipelines ingress, the model "
            "servers' gateways, the LLM's OpenAI ingress), as JSON. On a cluster whose GPU "
            "workers come and go, '{\"node:__internal_head__\": 0.001}' keeps the routers on "
            "the head, so losing a worker never loses a request in flight in a router."
        ),
    )


def router_actor_options() -> dict[str, Any]:
    """The Serve `ray_actor_options` entries a request router adds (none by default)."""
    resources = AppSettings().router_resources
    return {"resources": dict(resources)} if resources else {}
