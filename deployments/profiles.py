"""Resource profiles: Serve deployment options per model server, CPU or GPU.

Chosen by configuration (``SERVEGRAPH_PROFILE=gpu``), never by code changes. A
pipeline's per-node `deployment=` overrides are applied on top (see `servegraph.planner`).
"""

from __future__ import annotations

from typing import Any

# Every model server has a bounded queue at each caller (`max_queued_requests`): past it,
# a call is refused at once (503 with Retry-After on the server's own HTTP routes; a
# pipeline answers 503 naming the node), never queued without bound.
_SHED = {"backpressure_config": {"status_code": 503, "retry_after_s": 1}}

# Replicas, and why a single replica death stays invisible to pipelines:
# every catalog method is idempotent, so the pipeline ingress repeats a call whose
# replica died (servegraph.handles.ServeInvoker) within the request's deadline. On the
# CPU profile one replica of each encoder is enough: the retry waits for the restarted
# replica (a MiniLM replica restarts in seconds, well inside the 60 s default
# deadline), and a second resting replica would halve batch sizes on 2 cores. On the
# GPU profile the encoders keep two replicas, so the retry lands on the survivor at
# once; a GPU tenth is cheap.
#
# Each encoder replica asks for 2 CPUs on the CPU profile: Ray sets a replica's
# OMP_NUM_THREADS to its CPU ask, so that is also torch's thread count, and a forward pass
# of 64 sentences runs at 200 items/s on 1 thread and 280-390 on 2 (issue 10's closing
# note). A smaller ask starves the model; more threads than cores only contend. Idle
# OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE; KMP_BLOCKTIME=0 for
# Intel's runtime), so they leave the cores to the proxy and the other replicas between
# batches: classifier p99 at 50 requests/s 165 ms spinning, 102 ms passive.
_ENCODER_ACTOR = {
    "num_cpus": 2,
    "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}},
}
_CPU: dict[str, dict[str, Any]] = {
    "embedder": {
        "ray_actor_options": _ENCODER_ACTOR,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
        "max_ongoing_requests": 128,
        "max_queued_requests": 256,
        **_SHED,
    },
    "classifier": {
        "ray_actor_options": _ENCODER_ACTOR,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
        "max_ongoing_requests": 128,
        "max_queued_requests": 256,
        **_SHED,
    },
    # One replica by design (see deployments/vector_index.py): a death is a restart
    # that rebuilds FAISS from SQLite, and the retried calls wait for it.
    "vector_index": {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.5},
        "max_ongoing_requests": 256,
        "max_queued_requests": 512,
        **_SHED,
    },
    # vLLM batches continuously up to max_num_seqs=64; a bounded queue beyond that.
    # A death costs an engine restart (about a minute here): calls retried within
    # their deadline wait for it, later ones are answered 503.
    "llm": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "max_ongoing_requests": 64,
        "max_queued_requests": 64,
        **_SHED,
    },
}

_TWO_REPLICAS = {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 32}
_GPU: dict[str, dict[str, Any]] = {
    **_CPU,
    "embedder": {
        **_CPU["embedder"],
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.1},
        "autoscaling_config": _TWO_REPLICAS,
    },
    "classifier": {
        **_CPU["classifier"],
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.1},
        "autoscaling_config": _TWO_REPLICAS,
    },
    "llm": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
        "max_ongoing_requests": 256,
        "max_queued_requests": 256,
        **_SHED,
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
