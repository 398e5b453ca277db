"""Test tiers: `unit` (no Ray; starting Ray fails loudly), `integration` (one real local
Ray Serve cluster per session, started and stopped by the suite) and `reliability`
(overload, kills, concurrent writers, fuzzing; on that same cluster, after the rest)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


pytest_plugins = ["tests._cluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if "tests/reliability" in path:
            item.add_marker(pytest.mark.reliability)
        if "tests/integration" in path or "tests/reliability" in path:
            item.add_marker(pytest.mark.integration)
        if "integration" not in item.keywords:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Unit tests must not start Ray: make ray.init raise, as Ray Serve's own unit conftest does."""
    if "integration" in request.keywords:
        yield
        return
    try:
        import ray
    except ImportError:
        yield
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; mark the test `integration`")

    monkeypatch.setattr(ray, "init", refuse)
    yield
