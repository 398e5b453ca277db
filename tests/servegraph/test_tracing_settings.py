"""Tracing is configured from the standard OpenTelemetry variables: exporters, one or
several, or none; the OTLP exporters read their endpoint and headers themselves."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from pydantic import ValidationError

from servegraph.telemetry.tracing import TracingSettings, serve_tracing_env, span_processors


def test_off_by_default_and_off_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not TracingSettings().enabled
    assert serve_tracing_env() == {} and span_processors() == []


def test_several_exporters_each_get_a_processor(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "file, otlp")
    monkeypatch.setenv("SERVEGRAPH_TRACING_FILE_DIR", str(tmp_path))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer abc")
    assert TracingSettings().exporters == ["file", "otlp"]
    file_processor, otlp_processor = span_processors()
    assert isinstance(file_processor, SimpleSpanProcessor)
    assert isinstance(otlp_processor, BatchSpanProcessor)
    # The exporter read the standard variables itself (that the headers reach a
    # collector is tested against a receiver that refuses exports without them:
    # tests/integration/test_tracing.py, test_simulated_cluster.py).
    assert otlp_processor.span_exporter._endpoint == "https://collector.example:4318/v1/traces"
    otlp_processor.shutdown()
    file_processor.shutdown()
    env = serve_tracing_env()
    assert (
        env["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"]
        == "servegraph.telemetry.tracing:span_processors"
    )
    assert env["OTEL_SERVICE_NAME"]


def test_an_unknown_exporter_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="jaeger"):
        TracingSettings(exporter="file,jaeger")


def test_grpc_is_chosen_by_the_standard_protocol_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    (processor,) = span_processors()
    assert isinstance(processor.span_exporter, OTLPSpanExporter)
    processor.shutdown()
