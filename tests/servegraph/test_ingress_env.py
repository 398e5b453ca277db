"""What a local cluster's settings put in the environment Ray starts with (the ingress,
Ray's one-machine mode), and that they leave the environment as they found it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from servegraph.deploy import local_ray
from servegraph.deploy.local_ray import _ingress_environment


def test_haproxy_files_are_private_and_its_ports_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "8404")  # an earlier value
    with _ingress_environment("haproxy") as env:
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
    assert not private.exists()
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"  # restored
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in os.environ


def test_an_operators_drain_period_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    with _ingress_environment("haproxy") as env:
        assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in env
        assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_serves_proxy_sets_an_inherited_haproxy_switch_aside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # would start Serve's defaults
    with _ingress_environment("proxy") as env:
        assert env == {} and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_a_failure_inside_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    seen: list[Path] = []
    with (
        pytest.raises(RuntimeError, match="Ray did not start"),
        _ingress_environment("haproxy") as env,
    ):
        seen.append(Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]))
        raise RuntimeError("Ray did not start")
    (private,) = seen
    assert not private.exists() and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


def test_an_unknown_ingress_is_refused() -> None:
    with pytest.raises(ValueError, match="'proxy' or 'haproxy'"), _ingress_environment("nginx"):
        pass


@pytest.mark.parametrize(
    ("address", "one_machine"),
    [
        ("127.0.0.1:6379", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("auto", True),  # RAY_ADDRESS below, as `ray.init` looks it up
        ("10.0.0.5:6379", False),
        ("head.internal:6379", False),
    ],
)
def test_a_loopback_address_is_attached_in_rays_one_machine_mode(
    monkeypatch: pytest.MonkeyPatch, address: str, one_machine: bool
) -> None:
    """A local platform's GCS listens on 127.0.0.1 only: a process outside Ray's
    one-machine mode would turn that address into the machine's outward one and wait
    for ever. The mode is on only while `ray.init` runs."""
    import ray
    from ray._private import ray_constants

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:41234" if address == "auto" else "")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the token: the test below
    before = ray_constants.ENABLE_RAY_CLUSTER  # True on Linux, False on macOS
    seen: list[tuple[str, bool, str | None]] = []

    def init(**kwargs: object) -> None:
        mode = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        seen.append((str(kwargs["address"]), ray_constants.ENABLE_RAY_CLUSTER, mode))

    monkeypatch.setattr(ray, "init", init)
    local_ray.attach(address)
    expected = "127.0.0.1:41234" if address == "auto" else address
    assert seen == [(expected, False, "0") if one_machine else (expected, before, None)]
    assert before == ray_constants.ENABLE_RAY_CLUSTER
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


@pytest.mark.parametrize(
    ("address", "preset", "token", "mode"),
    [
        ("127.0.0.1:6379", None, True, "token"),  # a local platform's, as `ray.init` left it
        ("auto", None, True, "token"),
        ("127.0.0.1:6379", None, False, None),  # no token at hand: nothing changes
        ("127.0.0.1:6379", "disabled", True, "disabled"),  # the operator's choice wins
        ("10.0.0.5:6379", None, True, None),  # never sent to another machine
    ],
)
def test_attach_sends_a_local_platforms_ray_token(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    address: str,
    preset: str | None,
    token: bool,
    mode: str | None,
) -> None:
    """`ray.init` starts a local platform's Ray with token authentication on (Ray 2.60),
    its token in ~/.ray/auth_token; a process that joins it (`servegraph batch
    --address`) sends that token, or Ray refuses it. Another machine's Ray never gets
    it: the operator sets RAY_AUTH_MODE for that."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    before = os.environ.get("RAY_AUTH_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.ray/auth_token: only the one made here
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:41234" if address == "auto" else "")
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.setenv(name, "")  # recorded, so that undo restores (or removes) it
        monkeypatch.delenv(name)
    if preset is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", preset)
    if token:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("ab" * 32)
    seen: list[str | None] = []
    monkeypatch.setattr(ray, "init", lambda **_: seen.append(os.environ.get("RAY_AUTH_MODE")))
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        local_ray.attach(address)
    finally:
        monkeypatch.undo()  # the environment first, then Ray's caches re-read it
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    assert seen == [mode]
    assert os.environ.get("RAY_AUTH_MODE") == before  # nothing left for later tests
