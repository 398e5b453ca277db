"""What every model server's Serve application shares: the builder's arguments, how
profile defaults and overrides combine, and the options all servers start from.

Each server's CPU and GPU defaults live with its deployment (`PROFILES` in
`deployments/<server>/server.py`), chosen by configuration (``SERVEGRAPH_PROFILE=gpu``),
never by code changes. Serve calls a server's builder (`app(args)`) with the `args` of
its config entry: deployment option overrides (replicas, autoscaling, resources) on top
of the profile, and constructor arguments. A pipeline's per-node `deployment=`
overrides arrive the same way (see `servegraph.deploy.planner`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from deployments.settings import ModelSettings
from servegraph.server import check_graph_autoscaling, graph_autoscaling

# Every model server has a bounded queue at each caller (`max_queued_requests`): past it,
# a call is refused at once (503 with Retry-After on the server's own HTTP routes; a
# pipeline answers 503 naming the node), never queued without bound.
SHED = {"backpressure_config": {"status_code": 503, "retry_after_s": 1}}

# Replicas, and why a single replica death stays invisible to pipelines: every catalog
# method is idempotent, so the pipeline ingress repeats a call whose replica died
# (servegraph.serving.handles.ServeInvoker) within the request's deadline. On the CPU profile
# one replica of each encoder is enough: the retry waits for the restarted replica (a
# MiniLM replica restarts in seconds, well inside the 60 s default deadline), and a
# second resting replica would halve batch sizes on 2 cores. On the GPU profile the
# encoders keep two replicas, so the retry lands on the survivor at once; a GPU tenth is
# cheap.
#
# Each encoder replica asks for 2 CPUs on the CPU profile: Ray sets a replica's
# OMP_NUM_THREADS to its CPU ask, so that is also torch's thread count, and a forward pass
# of 64 sentences runs at 200 items/s on 1 thread and 280-390 on 2 (issue 10's closing
# note). A smaller ask starves the model; more threads than cores only contend. Idle
# OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE; KMP_BLOCKTIME=0 for
# Intel's runtime), so they leave the cores to the proxy and the other replicas between
# batches: classifier p99 at 50 requests/s 165 ms spinning, 102 ms passive.
ENCODER_ACTOR = {
    "num_cpus": 2,
    "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}},
}
ENCODER_CPU: dict[str, Any] = {
    "ray_actor_options": ENCODER_ACTOR,
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    "max_ongoing_requests": 128,
    "max_queued_requests": 256,
    **SHED,
}
ENCODER_GPU: dict[str, Any] = {
    **ENCODER_CPU,
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.1},
    "autoscaling_config": {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 32},
}


def encoder_profiles(server: str, *, gpu_service_time_s: float) -> dict[str, dict[str, Any]]:
    """An encoder's CPU and GPU profiles.

    On the GPU profile (a cluster, where a replica adds capacity) the encoder is scaled
    by the pipelines' arrivals (`servegraph.deploy.scaling`) within the bounds above, a call
    costing a replica `gpu_service_time_s` at full load. On the CPU profile (one
    machine) it keeps Serve's default policy, which waits 30 s of a long queue before a
    second replica: on 2 cores a second replica adds no capacity and halves the batches,
    so it is for a sustained queue only, never for a burst the ingress is refusing."""
    gpu_scaling = graph_autoscaling(
        server, service_time_s=gpu_service_time_s, **ENCODER_GPU["autoscaling_config"]
    )
    return {"cpu": ENCODER_CPU, "gpu": {**ENCODER_GPU, "autoscaling_config": gpu_scaling}}


# A replica whose data lives on the local disk of the node it runs on is pinned to the
# head node (Ray's `node:__internal_head__` resource): the head is never scaled down,
# while a worker (and its disk) goes after 10 idle minutes (cluster.yaml).
HEAD_NODE = {"node:__internal_head__": 0.001}

Profiles = Mapping[str, Mapping[str, Any]]


class ServerAppArgs(BaseModel):
    overrides: dict[str, Any] | None = Field(None, description="Serve deployment options.")
    init: dict[str, Any] = Field(default_factory=dict, description="Constructor kwargs.")

    @classmethod
    def of(cls, args: ServerAppArgs | dict[str, Any] | None) -> ServerAppArgs:
        return cls.model_validate(args or {})


def server_app(
    server: str,
    deployment: Any,
    profiles: Profiles,
    args: ServerAppArgs | dict[str, Any] | None,
    check: Callable[[dict[str, Any]], None] | None = None,
    models: Sequence[str | Path] = (),
) -> Any:
    """A model server's Serve application: its `deployment` (a @serve.deployment class)
    with the profile's options and `args` on top (`check`ed), behind its gateway. The
    replicas check that they load the same `models` (folders) as this builder sees."""
    from servegraph.server import gateway_app, with_expected_model

    args = ServerAppArgs.of(args)
    options = options_for(profiles, overrides=args.overrides)
    if check is not None:
        check(options)
    options = with_expected_model(options, *models)
    return gateway_app(server, deployment.options(**options).bind(**args.init))


def options_for(
    profiles: Profiles, profile: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A server's deployment options under `profile` (default: the configured one), with
    `overrides` on top; a graph-aware policy's options out of range are refused, naming
    the field."""
    defaults = profiles[profile or ModelSettings().profile]
    options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("num_replicas", "autoscaling_config"):  # the two are exclusive in Serve
            options.pop("num_replicas", None)
            options.pop("autoscaling_config", None)
        options[key] = value
    check_graph_autoscaling(options.get("autoscaling_config"))
    return options
