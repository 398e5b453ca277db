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


def test_cluster_nodes_start_with_the_request_path_settings_local_ray_uses() -> None:
    from servegraph.local_ray import SERVE_REQUEST_PATH_ENV

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        started = " ".join(commands)
        for name, value in SERVE_REQUEST_PATH_ENV.items():
            assert f"{name}={value}" in started, name
