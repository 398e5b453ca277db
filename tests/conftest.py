"""Test tiers: `unit` (no Ray; starting Ray fails loudly), `integration` (one real local
Ray Serve cluster per session, started and stopped by the suite) and `reliability`
(overload, kills, concurrent writers, fuzzing; on that same cluster, after the rest)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# API keys are on in every test, as in production: the session has its own key store,
# and an admin key every client of the suite sends (`servegraph.security.client.client_headers`).
# The cluster's replicas inherit both settings. Tests of the keys themselves make more.
AUTH_DIR = Path(tempfile.mkdtemp(prefix="servegraph-test-auth-"))
os.environ["SERVEGRAPH_AUTH_KEYS"] = str(AUTH_DIR / "keys.sqlite3")
os.environ.pop("SERVEGRAPH_AUTH_UNSAFE_DISABLED", None)
# The answer cache is on for one tenant's keys only: every other test's request runs its
# graph, as it asserts (tokens, spans, costs); the cache's own tests use that tenant.
os.environ["SERVEGRAPH_ANSWER_CACHE_TENANTS"] = '["cached"]'
# The session's traffic splits between pipeline versions, never a previous session's.
os.environ["SERVEGRAPH_TRAFFIC"] = str(AUTH_DIR / "traffic.json")


# Where the console reads the model servers' history: where the Prometheus of
# tests/integration/test_observe.py listens while it runs. A fixed port below the
# ephemeral range (so no connection made meanwhile takes it, as one could take a port
# picked free now and bound later) and below Ray's worker ports (10002 and up).
PROMETHEUS_PORT = int(os.environ.get("SERVEGRAPH_TEST_PROMETHEUS_PORT", "9491"))
os.environ["SERVEGRAPH_PROMETHEUS_URL"] = f"http://127.0.0.1:{PROMETHEUS_PORT}"


def _admin_key() -> str:
    from servegraph.security.keys import KeyStore

    return KeyStore(AUTH_DIR / "keys.sqlite3").ensure_local_admin(AUTH_DIR / "local-admin.key")[0]


os.environ["SERVEGRAPH_API_KEY"] = _admin_key()


pytest_plugins = ["tests._cluster"]


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's folders made at import (the key store, the span files) go when it
    ends, whichever tests ran."""
    from tests._cluster import SPANS_DIR

    for folder in (AUTH_DIR, Path(SPANS_DIR)):
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests with a Ray cluster of their own (the simulated multi-node cluster, the
    # capacity check against Ray's scheduler) run before the session's shared cluster
    # (`servegraph run`, tests/_cluster.py) starts: the simulated cluster serves the whole
    # platform, and this machine holds one platform's models at a time.
    items.sort(key=lambda item: "own_cluster" not in item.keywords)
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
