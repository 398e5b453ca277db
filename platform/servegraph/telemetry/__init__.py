"""Telemetry: Prometheus metrics, OpenTelemetry tracing and the Prometheus the operators
run (`servegraph observe`). Imports Ray only inside functions.
"""
