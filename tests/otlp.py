"""A minimal OTLP/HTTP trace receiver on loopback, standing in for a collector.

It decodes what the real OTLP exporters send (protobuf `ExportTraceServiceRequest`),
so a test sees a trace exactly as Jaeger or Tempo would receive it. Like an
authenticated collector it refuses exports without its token (`x-collector-token`,
which the exporters send from OTEL_EXPORTER_OTLP_HEADERS). Written by hand
because the OpenTelemetry Python packages ship exporters, not a receiver.
"""

from __future__ import annotations

import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OtlpReceiver:
    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[dict[str, Any]] = []
        self.refused = 0  # exports without the token
        self.token = secrets.token_hex(8)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's API
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("x-collector-token") != receiver.token:
                    with receiver._lock:
                        receiver.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                received = [
                    {
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex() or None,
                        "service": _service(resource),
                        "error": span.status.code == 2,  # STATUS_CODE_ERROR
                    }
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                ]
                with receiver._lock:
                    receiver.spans += received
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(
        self, trace_id: str, until: Any = lambda spans: bool(spans), timeout_s: float = 60
    ) -> list[dict[str, Any]]:
        """The spans received for `trace_id`, once `until(spans)` holds (exporters batch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if until(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.5)

    def close(self) -> None:
        self.server.shutdown()


def _service(resource: Any) -> str:
    for attribute in resource.resource.attributes:
        if attribute.key == "service.name":
            return attribute.value.string_value
    return ""


def ingress_span() -> str:
    """The name a request's first span starts with, on the local cluster's ingress:
    Serve's proxy's `proxy_http_request`, or with HAProxy in front (which makes no span)
    the pipeline ingress replica's own `replica_handle_request PipelineIngress ...`,
    continuing the caller's `traceparent` all the same."""
    from servegraph.settings import AppSettings

    if AppSettings().ingress == "proxy":
        return "proxy_http_request"
    return "replica_handle_request PipelineIngress"
