"""OpenTelemetry tracing, on top of Ray Serve's own.

Ray Serve already traces its proxy, router and replicas and carries the W3C trace
context across every process boundary (HTTP `traceparent` in, handle calls between
replicas). We configure that machinery (`serve_tracing_config`) with our exporter
factory (`span_processors`), and add the spans Serve cannot know about: one per graph
node in the ingress (`node_span`), and model attributes (GenAI usage, retrieval scores,
classifier label, batch size and queue wait) on the replica spans (`annotate`).

Configuration, from the standard OpenTelemetry variables where one exists:
    OTEL_TRACES_EXPORTER         none | otlp | console | file (default none); several,
                                 comma-separated, export to each (e.g. "file,otlp").
                                 `file` is ours: one JSON span per line.
    OTEL_EXPORTER_OTLP_PROTOCOL  http/protobuf (default) | grpc (or ..._TRACES_PROTOCOL)
    OTEL_EXPORTER_OTLP_ENDPOINT, _HEADERS, _CERTIFICATE, _TIMEOUT (and their _TRACES_
                                 forms): read by the OTLP exporters themselves, so an
                                 authenticated (headers) or TLS collector works as
                                 everywhere else
    OTEL_TRACES_SAMPLER_ARG      0..1 (parent-based: a sampled client trace stays sampled)
    OTEL_SERVICE_NAME            the service name on every span (default servegraph)
    SERVEGRAPH_TRACING_FILE_DIR  where the file exporter writes (no standard variable)

With the exporter "none" nothing is installed and `node_span` returns None, so the
runtime skips the hook entirely: tracing off costs one attribute check per node.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TRACER_NAME = "servegraph"
Exporter = Literal["console", "otlp", "file"]
EXPORTERS: tuple[Exporter, ...] = ("console", "otlp", "file")


class TracingSettings(BaseSettings):
    """Tracing settings, each read from its standard OpenTelemetry variable."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    exporter: str = Field(
        "none",
        validation_alias=AliasChoices("exporter", "OTEL_TRACES_EXPORTER"),
        description="none, or a comma-separated list of: " + ", ".join(EXPORTERS),
    )
    protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf",
        validation_alias=AliasChoices(
            "protocol", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
        ),
    )
    file_dir: Path | None = Field(
        None,
        validation_alias=AliasChoices("file_dir", "SERVEGRAPH_TRACING_FILE_DIR"),
        description="Folder for the file exporter.",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("sample_ratio", "OTEL_TRACES_SAMPLER_ARG"),
    )

    @field_validator("exporter")
    @classmethod
    def _known_exporters(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in ("none", *EXPORTERS)]
        if unknown:
            raise ValueError(f"unknown exporter(s) {unknown}; use none or {list(EXPORTERS)}")
        return ",".join(names) or "none"

    @property
    def exporters(self) -> list[Exporter]:
        return [name for name in self.exporter.split(",") if name != "none"]  # type: ignore[misc]

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


def serve_tracing_config(settings: TracingSettings | None = None) -> Any:
    """The `TracingConfig` for `serve.start` (and, dumped, a Serve config file's
    `tracing_config`), or None when tracing is off."""
    settings = settings or TracingSettings()
    if not settings.enabled:
        return None
    from ray.serve.schema import TracingConfig

    return TracingConfig(
        enabled=True,
        exporter_import_path="servegraph.telemetry.tracing:span_processors",
        sampling_ratio=settings.sample_ratio,
    )


def serve_tracing_env(settings: TracingSettings | None = None) -> dict[str, str]:
    """Environment that turns Serve's tracing on in processes that read no TracingConfig.

    Ray 2.60 hands `serve.start(tracing_config=...)` to replicas but not to the HTTP
    proxy, which reads these variables instead; without them the proxy drops the
    client's `traceparent`. Set them before Ray starts so every process inherits them.
    """
    settings = settings or TracingSettings()
    if not settings.enabled:
        return {}
    return {
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "servegraph.telemetry.tracing:span_processors",
        "RAY_SERVE_TRACING_SAMPLING_RATIO": str(settings.sample_ratio),
        # The SDK names every process's resource from this; without it backends show
        # "unknown_service:python".
        "OTEL_SERVICE_NAME": os.environ.get("OTEL_SERVICE_NAME", "servegraph"),
    }


def span_processors() -> list[Any]:
    """Exporter factory Ray Serve calls (without arguments) in each proxy and replica."""
    settings = TracingSettings()
    return [_span_processor(name, settings) for name in settings.exporters]


def _span_processor(exporter: Exporter, settings: TracingSettings) -> Any:
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    # The OTLP exporters read OTEL_EXPORTER_OTLP_* (endpoint, headers, certificate,
    # timeout, compression) themselves when given no arguments.
    if exporter == "otlp" and settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return BatchSpanProcessor(OTLPSpanExporter())
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return BatchSpanProcessor(HttpExporter())
    if exporter == "file":
        folder = settings.file_dir or Path("var/spans")
        folder.mkdir(parents=True, exist_ok=True)
        out = open(folder / f"spans-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115 - lives with the exporter
        span_exporter = ConsoleSpanExporter(
            out=out, formatter=lambda s: s.to_json(indent=None) + "\n"
        )
        return SimpleSpanProcessor(span_exporter)
    return BatchSpanProcessor(ConsoleSpanExporter())


def enabled_here() -> bool:
    """Whether this process has a real (SDK) tracer provider installed."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    return isinstance(trace.get_tracer_provider(), TracerProvider)


def node_hook(pipeline: str) -> Any:
    """A `Runtime` node hook making one span per node attempt, or None when off."""
    if not enabled_here():
        return None
    from opentelemetry import trace

    tracer = trace.get_tracer(TRACER_NAME)

    def hook(node: Any, qualified: str, attempt: int, role: str = "attempt") -> Any:
        return _node_span(tracer, pipeline, node, qualified, attempt, role)

    return hook


@contextmanager
def _node_span(
    tracer: Any, pipeline: str, node: Any, qualified: str, attempt: int, role: str = "attempt"
):
    from opentelemetry.trace import Status, StatusCode

    attributes = {
        "servegraph.pipeline": pipeline,
        "servegraph.node.name": qualified,
        "servegraph.node.kind": node.kind,
        "servegraph.node.attempt": attempt,
        "servegraph.node.role": role,  # "attempt", or "fallback": what ran when it failed
    }
    if getattr(node, "server", None):
        attributes["servegraph.server"] = f"{node.server}.{node.method}"
    name = f"node {qualified}" if role == "attempt" else f"node {qualified} ({role})"
    with tracer.start_as_current_span(name, attributes=attributes, record_exception=True) as span:
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("servegraph.node.outcome", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        span.set_attribute("servegraph.node.outcome", "ok")


def annotate(**attributes: Any) -> None:
    """Set attributes on the current span (a Serve replica span, or a node span)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def current_trace_id() -> str | None:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
