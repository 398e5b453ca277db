"""Resource profiles: Serve deployment options per model server, CPU or GPU.

Chosen by configuration (``SERVEGRAPH_PROFILE=gpu``), never by code changes. A
pipeline's per-node `deployment=` overrides are applied on top (see the compiler).
"""

from __future__ import annotations

from typing import Any

_CPU: dict[str, dict[str, Any]] = {
    "embedder": {
        "ray_actor_options": {"num_cpus": 1},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
        "max_ongoing_requests": 128,
    },
    "classifier": {
        "ray_actor_options": {"num_cpus": 1},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
        "max_ongoing_requests": 128,
    },
    "vector_index": {  # one replica by design: see deployments/vector_index.py
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.5},
        "max_ongoing_requests": 256,
    },
    "llm": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "max_ongoing_requests": 64,
    },
    "ingress": {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.5},
        "max_ongoing_requests": 256,
    },
}

_GPU: dict[str, dict[str, Any]] = {
    **_CPU,
    "embedder": {**_CPU["embedder"], "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.1}},
    "classifier": {**_CPU["classifier"], "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.1}},
    "llm": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
        "max_ongoing_requests": 256,
    },
}

PROFILES = {"cpu": _CPU, "gpu": _GPU}

# vLLM's own GPU share on the GPU profile: the engine reserves this fraction of memory,
# and the placement group asks Ray for the same fraction of the device.
LLM_GPU_FRACTION = 0.6


def options_for(server: str, profile: str, overrides: dict[str, Any] | None = None) -> dict:
    """Deployment options for `server` under `profile`, with `overrides` on top."""
    options = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in PROFILES[profile][server].items()
    }
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("num_replicas", "autoscaling_config"):  # the two are exclusive in Serve
            options.pop("num_replicas", None)
            options.pop("autoscaling_config", None)
        options[key] = value
    return options
