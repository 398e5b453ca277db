"""Where the application the framework serves lives, in one place: the catalog of model
servers and the package of pipelines. Read from the environment (`SERVEGRAPH_CATALOG`,
`SERVEGRAPH_PIPELINES`); the CLI's `--catalog` and `--package` override them and pass
them down, so no module of the framework names the application itself."""

from __future__ import annotations

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
