"""HAProxy's own errors as the platform's 502 (`servegraph.serving.haproxy_answers`): the
file HAProxy sends is a whole, well-formed HTTP response, the controller's hook puts the
platform's manager in place of Serve's with Serve's options, and that manager writes the
file over Serve's bare 500 before HAProxy starts. Real HAProxy answering with it, for a
replica killed mid-request, is tests/reliability/test_cluster_kill.py's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h11
import pytest
from ray.serve._private import controller
from ray.serve._private import haproxy as serves

from servegraph.deploy.local_ray import HAPROXY_ANSWERS_HOOK, _ingress_environment
from servegraph.serving import haproxy_answers


def parse(raw: bytes) -> tuple[Any, bytes]:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    connection.receive_data(raw)
    response = connection.next_event()
    body = b""
    while not isinstance(event := connection.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), event
        body += event.data
    return response, body


def test_haproxys_answer_is_the_platforms_502_for_a_lost_replica() -> None:
    response, body = parse(haproxy_answers.error_file().encode())
    assert isinstance(response, h11.Response) and response.status_code == 502
    headers = {name.decode(): value.decode() for name, value in response.headers}
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["error"] == "ReplicaLost" and "HAProxy" in answer["detail"]
    assert "may or may not have been carried out" in answer["detail"]
    assert answer["fix"].startswith("retry after Retry-After")


def test_the_hook_puts_the_platforms_manager_in_place_of_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(controller, "HAProxyManager", serves.HAProxyManager)
    haproxy_answers.use_platform_answers()
    replaced = controller.HAProxyManager
    assert replaced is not serves.HAProxyManager
    assert replaced.__ray_actor_class__ is haproxy_answers.HAProxyManager
    assert issubclass(haproxy_answers.HAProxyManager, serves.HAProxyManager.__ray_actor_class__)
    assert replaced._default_options == serves.HAProxyManager._default_options
    assert haproxy_answers.HAProxyManager.__name__ == "HAProxyManager"


def test_a_hook_that_finds_serve_changed_leaves_serves_manager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = object()
    monkeypatch.setattr(controller, "HAProxyManager", other)
    haproxy_answers.use_platform_answers()
    assert controller.HAProxyManager is other


def test_the_platforms_manager_writes_its_file_over_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error_file = tmp_path / "500.http"

    def serves_init(self: Any, *args: Any, **kwargs: Any) -> None:  # what matters of it
        error_file.write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
        self._haproxy = SimpleNamespace(cfg=SimpleNamespace(error_file_path=str(error_file)))

    monkeypatch.setattr(serves.HAProxyManager.__ray_actor_class__, "__init__", serves_init)
    haproxy_answers.HAProxyManager()
    assert error_file.read_bytes() == haproxy_answers.error_file().encode()

    def unwritable(self: Any, *args: Any, **kwargs: Any) -> None:  # a folder, not a file
        self._haproxy = SimpleNamespace(cfg=SimpleNamespace(error_file_path=str(tmp_path)))

    monkeypatch.setattr(serves.HAProxyManager.__ray_actor_class__, "__init__", unwritable)
    haproxy_answers.HAProxyManager()  # HAProxy then starts with Serve's file


def test_the_haproxy_ingress_sets_the_hook_unless_the_operator_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH", raising=False)
    with _ingress_environment("haproxy") as env:
        assert env["RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH"] == HAPROXY_ANSWERS_HOOK
    with _ingress_environment("proxy") as env:
        assert "RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH" not in env
    monkeypatch.setenv("RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH", "ops.hook:mine")
    with _ingress_environment("haproxy") as env:
        assert "RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH" not in env
