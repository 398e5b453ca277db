"""Pipelines served by the platform: each module with `build_pipeline()` is one REST endpoint."""
