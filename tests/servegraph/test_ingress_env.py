"""What a local cluster's ingress setting puts in the environment Ray starts with."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from servegraph.local_ray import _ingress_environment


def test_haproxy_files_are_private_and_its_ports_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", raising=False)
    env = _ingress_environment("haproxy")
    try:
        private = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        for name in ("CONFIG_FILE_LOC", "SOCKET_PATH", "METRICS_SOCKET_PATH"):
            path = Path(env[f"RAY_SERVE_HAPROXY_{name}"])
            assert path.parent == private
            # Serve adds a directory named by the node id (56 characters); HAProxy
            # refuses a socket path past 97.
            assert len(str(path.parent / ("0" * 56) / path.name)) <= 97
        ports = [value for name, value in env.items() if name.endswith("_PORT")]
        assert len(ports) == 4 and "8404" not in ports and "9101" not in ports
        assert all(os.environ[name] == value for name, value in env.items())
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    finally:
        for name in env:
            os.environ.pop(name, None)
        private.rmdir()


def test_an_operators_drain_period_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    env = _ingress_environment("haproxy")
    for name in env:
        os.environ.pop(name, None)
    Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]).rmdir()
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in env


def test_serves_proxy_needs_nothing_and_an_unknown_ingress_is_refused() -> None:
    assert _ingress_environment("proxy") == {}
    with pytest.raises(ValueError, match="'proxy' or 'haproxy'"):
        _ingress_environment("nginx")
