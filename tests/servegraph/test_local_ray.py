"""The local cluster `servegraph run` starts (`servegraph.local_ray.local_cluster`) is a
loopback node, so Ray's metrics export (per-key request counts, costs, pipeline names;
no authentication) and the dashboard agent listen on 127.0.0.1, not on every interface.
Checked on the arguments `ray.init` gets and on how Ray resolves and binds them, without
starting Ray."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import ray
from ray._common.network_utils import get_localhost_ip, is_localhost
from ray._private import ray_constants, services

from servegraph import local_ray


class Stop(Exception):
    """Raised by the fake `ray.init`: nothing after it runs."""


def test_the_local_node_is_a_loopback_one(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        seen.update(kwargs)
        # The node's address as ray.init settles it, while it starts the node: the one
        # it is given, resolved, or else the one Ray finds itself.
        given = kwargs.get("_node_ip_address")
        seen["node"] = services.resolve_ip_for_localhost(given) if given else None
        seen["default"] = services.get_node_ip_address()
        raise Stop

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(local_ray, "_prepare_environment", lambda: None)
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(Stop), local_ray.local_cluster(dashboard=False, metrics_port=45123):
        pass
    assert (seen["node"] or seen["default"]) == get_localhost_ip() == "127.0.0.1"
    assert seen["default"] == "127.0.0.1"  # where Ray would look, the same
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["dashboard_host"] == "127.0.0.1"
    assert seen["_metrics_export_port"] == 45123
    assert ray_constants.ENABLE_RAY_CLUSTER is enabled  # only during ray.init


def test_without_it_linux_would_turn_the_loopback_address_into_a_routable_one() -> None:
    """What the fix works around, so a Ray upgrade that changes it shows here."""
    if not ray_constants.ENABLE_RAY_CLUSTER:
        pytest.skip("multi-node clusters are off here (macOS, Windows): loopback anyway")
    resolved = services.resolve_ip_for_localhost("127.0.0.1")
    assert resolved == services.get_node_ip_address()


def test_ray_binds_the_metrics_export_to_loopback_only_for_a_loopback_node() -> None:
    """The reporter agent (the process serving the metrics export) chooses its bind
    address from the node's: the loopback address for a loopback node, else every
    interface. Read from Ray's source, as that agent only runs inside a Ray node."""
    spec = importlib.util.find_spec("ray.dashboard.modules.reporter.reporter_agent")
    assert spec and spec.origin
    source = Path(spec.origin).read_text()
    assert "address=get_localhost_ip() if is_localhost(self._ip) else" in source
    assert is_localhost("127.0.0.1")
