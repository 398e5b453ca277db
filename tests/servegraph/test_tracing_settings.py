"""Tracing is configured from the environment: exporters, one or several, or none."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from pydantic import ValidationError

from servegraph.tracing import TracingSettings, serve_tracing_env, span_processors


def test_off_by_default_and_off_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVEGRAPH_TRACING_EXPORTER", raising=False)
    assert not TracingSettings().enabled
    assert serve_tracing_env() == {} and span_processors() == []


def test_several_exporters_each_get_a_processor(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SERVEGRAPH_TRACING_EXPORTER", "file, otlp-http")
    monkeypatch.setenv("SERVEGRAPH_TRACING_FILE_DIR", str(tmp_path))
    monkeypatch.setenv("SERVEGRAPH_TRACING_ENDPOINT", "http://127.0.0.1:4318")
    assert TracingSettings().exporters == ["file", "otlp-http"]
    file_processor, otlp_processor = span_processors()
    assert isinstance(file_processor, SimpleSpanProcessor)
    assert isinstance(otlp_processor, BatchSpanProcessor)
    otlp_processor.shutdown()
    file_processor.shutdown()
    env = serve_tracing_env()
    assert env["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"] == "servegraph.tracing:span_processors"
    assert env["OTEL_SERVICE_NAME"]


def test_an_unknown_exporter_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="jaeger"):
        TracingSettings(exporter="file,jaeger")
