"""cluster.yaml is a valid Ray cluster launcher config with a CPU head and a GPU worker."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # fills Ray's defaults, then its JSON schema
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("scripts/install.sh" in c for c in config["setup_commands"])
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "SERVEGRAPH_PROFILE=gpu" in starts
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "SERVEGRAPH_ROUTER_RESOURCES='{\"node:__internal_head__\": 0.001}'" in " ".join(
            commands
        )


def test_gpu_profile_gives_fractions_by_configuration(monkeypatch) -> None:
    from deployments.embedder.server import PROFILES
    from deployments.serve_options import options_for

    monkeypatch.setenv("SERVEGRAPH_PROFILE", "gpu")
    gpu = options_for(PROFILES)["ray_actor_options"]
    assert 0 < gpu["num_gpus"] < 1
    monkeypatch.setenv("SERVEGRAPH_PROFILE", "cpu")
    assert "num_gpus" not in options_for(PROFILES)["ray_actor_options"]


def test_the_schema_check_can_fail() -> None:
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(config))


def test_cluster_nodes_start_with_the_ray_settings_local_ray_uses() -> None:
    from servegraph.deploy.local_ray import RAY_ENV

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        started = " ".join(commands)
        for name, value in RAY_ENV.items():
            assert f"{name}={value}" in started, name


# Ray's control plane (issue 24): every node's Ray starts with token authentication.


def _refused(tmp_path: Path, config: dict, capsys) -> str:
    """`servegraph check --cluster` and `build --cluster` on `config`: both refuse it
    (exit 1) before planning anything; what they printed."""
    from servegraph.cli import main

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", "--cluster", str(path), "--profile", "gpu"]) == 1
    out = capsys.readouterr().out
    assert main(["build", "--cluster", str(path), "-o", str(tmp_path / "serve.yaml")]) == 1
    assert not (tmp_path / "serve.yaml").exists()
    assert "refusing" in capsys.readouterr().out
    return out


def _without_auth(config: dict, key: str) -> dict:
    """`config` with RAY_AUTH_MODE=token taken out of `key`'s commands and out of the
    ~/.bashrc every node's setup writes it to."""
    config[key] = [c.replace("export RAY_AUTH_MODE=token ", "export ") for c in config[key]]
    config["setup_commands"] = [c for c in config["setup_commands"] if "RAY_AUTH_MODE" not in c]
    assert "RAY_AUTH_MODE" not in " ".join(config[key] + config["setup_commands"])
    return config


def test_every_node_of_cluster_yaml_starts_ray_with_token_auth_and_no_token_in_the_file() -> None:
    from servegraph.deploy.capacity.inputs import _ray_starts, ray_auth_problems

    assert ray_auth_problems(ROOT / "cluster.yaml") == []
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [s for c in config[key] for s in _ray_starts(c)]
        assert starts and all(mode == "token" for mode, _ in starts), key
    # The dashboard stays on the head's loopback (reached through `ray dashboard`).
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # The token reaches each node's default token path from a file outside the repo.
    source = config["file_mounts"]["~/.ray/auth_token"]
    assert source.startswith("~/") and not (ROOT / source).exists()
    assert "RAY_AUTH_TOKEN" not in text  # never a token (or its variable) in the file


def test_check_refuses_a_cluster_whose_head_starts_ray_without_token_auth(
    tmp_path: Path, capsys
) -> None:
    config = _without_auth(
        yaml.safe_load((ROOT / "cluster.yaml").read_text()), "head_start_ray_commands"
    )
    out = _refused(tmp_path, config, capsys)
    assert "head_cpu" in out and "RAY_AUTH_MODE=token" in out, out
    assert "worker_gpu" not in out, out  # the workers still export it


def test_check_refuses_a_cluster_whose_workers_start_ray_without_token_auth(
    tmp_path: Path, capsys
) -> None:
    config = _without_auth(
        yaml.safe_load((ROOT / "cluster.yaml").read_text()), "worker_start_ray_commands"
    )
    out = _refused(tmp_path, config, capsys)
    assert "worker_gpu" in out and "RAY_AUTH_MODE=token" in out, out
    assert "head_cpu" not in out, out


def test_check_refuses_an_open_dashboard_without_token_auth(tmp_path: Path, capsys) -> None:
    config = _without_auth(
        yaml.safe_load((ROOT / "cluster.yaml").read_text()), "head_start_ray_commands"
    )
    config["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host 0.0.0.0")
        for c in config["head_start_ray_commands"]
    ]
    out = _refused(tmp_path, config, capsys)
    assert "--dashboard-host=0.0.0.0" in out and "head_cpu" in out, out


def test_token_auth_counts_where_the_shell_gives_it_to_ray_start(tmp_path: Path) -> None:
    """Set in the command before `ray start` (exported, or as its prefix), or exported
    from ~/.bashrc by the node's setup: token auth. Set to another mode, set after `ray
    start`, or a shell variable never exported: refused."""
    from servegraph.deploy.capacity.inputs import ray_auth_problems

    def problems(head_start: str, setup: list[str] | None = None) -> list[str]:
        config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
        config["head_start_ray_commands"] = ["ray stop", head_start]
        config["setup_commands"] = setup or []
        config["worker_start_ray_commands"] = ["RAY_AUTH_MODE=token ray start --address=h:6379"]
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(config))
        return ray_auth_problems(path)

    assert not problems("export A=1 RAY_AUTH_MODE=token && ulimit -n 1 && ray start --head")
    assert not problems("RAY_AUTH_MODE=token ~/x/.venv/bin/ray start --head")
    assert not problems("env RAY_AUTH_MODE=token ray start --head --dashboard-host=0.0.0.0")
    persist = ["echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc"]
    assert not problems("ray start --head", persist)
    assert problems("ray start --head")
    assert problems("RAY_AUTH_MODE=token && ray start --head")  # not exported
    assert problems("ray start --head && export RAY_AUTH_MODE=token")
    assert problems("export RAY_AUTH_MODE=disabled && ray start --head", persist)
    assert problems("bash start-ray.sh")  # no visible `ray start`, nothing exported
    assert all("head_cpu" in p for p in problems("ray start --head"))


def test_the_simulated_clusters_ray_processes_get_token_auth_and_the_env_comes_back() -> None:
    """`ray.cluster_utils.Cluster` never turns Ray's token auth on (unlike `ray.init()`
    and `ray start --head`): `simulated_cluster` does, for its process and the Ray
    processes it starts, with a fresh token only its owner reads; all undone on exit.
    Starts no Ray, in a process of its own: it resets that process's Ray config and
    token cache, which a live Ray connection (the suite's cluster) must keep."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, stat
        from ray._raylet import (
            AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode,
        )
        from servegraph.deploy.local_ray import _ray_token_auth

        with _ray_token_auth() as token_file:
            assert os.environ["RAY_AUTH_MODE"] == "token"
            assert "RAY_AUTH_TOKEN" not in os.environ  # it would win over the file
            assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token_file)
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert len(token_file.read_text()) == 64
            assert get_authentication_mode() == AuthenticationMode.TOKEN
            sent = AuthenticationTokenLoader.instance().get_token_for_http_header()
            assert sent == {"authorization": "Bearer " + token_file.read_text()}
        assert os.environ["RAY_AUTH_TOKEN"] == "someone-elses"
        assert "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ
        assert not token_file.exists()
        assert get_authentication_mode() == AuthenticationMode.DISABLED
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env["RAY_AUTH_TOKEN"] = "someone-elses"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
