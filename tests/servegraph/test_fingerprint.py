"""Same model everywhere (`servegraph.deploy.fingerprint`): what a builder expects, what a
replica loaded, and the failed check that names both nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from servegraph.deploy.fingerprint import (
    ENV,
    SameModel,
    expected_env,
    fingerprint,
    with_expected_model,
)


def model(tmp_path: Path, weights: bytes = b"\x00\x01") -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"dim": 384}')
    (folder / "sub" / "weights.bin").write_bytes(weights)
    return folder


def test_the_fingerprint_follows_the_bytes_not_the_place(tmp_path: Path) -> None:
    a = model(tmp_path / "a")
    b = model(tmp_path / "b")
    assert fingerprint(a) == fingerprint(b)  # same files elsewhere: same model
    (b / "sub" / "weights.bin").write_bytes(b"\x00\x02")  # same size, other bytes
    assert fingerprint(a) != fingerprint(b)


def test_a_replica_with_other_files_fails_naming_both_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servegraph.deploy import fingerprint as module

    monkeypatch.setattr(module, "this_node", lambda: "head-node")
    monkeypatch.setenv(ENV, expected_env(model(tmp_path / "built"))[ENV])
    monkeypatch.setattr(module, "this_node", lambda: "worker-7")
    SameModel(model(tmp_path / "same")).check()  # the same bytes pass
    other = SameModel(model(tmp_path / "other", weights=b"\x09"))
    with pytest.raises(RuntimeError, match="model mismatch") as failed:
        other.check()
    assert "on worker-7" in str(failed.value) and "built on head-node" in str(failed.value)


def test_a_builder_without_the_files_expects_nothing(tmp_path: Path) -> None:
    options = {"ray_actor_options": {"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}}}}
    assert with_expected_model(options, tmp_path / "absent") == options
    merged = with_expected_model(options, model(tmp_path))
    env = merged["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["A"] == "1" and ENV in env and merged["ray_actor_options"]["num_cpus"] == 2
    assert ENV not in options["ray_actor_options"]["runtime_env"]["env_vars"]  # not mutated
