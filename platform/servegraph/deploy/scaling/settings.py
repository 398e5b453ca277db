"""A model server's graph-aware scaling options, checked when its application is built:
a value out of range is refused naming the field, before anything is deployed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICY_PATH = "servegraph.deploy.scaling.policy:GraphAwarePolicy"


class GraphScaling(BaseModel):
    """What `servegraph.deploy.scaling.policy.GraphAwarePolicy` needs for one server."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field(min_length=1, description="The catalog name of the model server.")
    service_time_s: float = Field(
        gt=0,
        le=600,
        description="Replica-seconds one call costs at full load (1 / a replica's calls "
        "per second), measured on the hardware the profile is for.",
    )
    target_utilisation: float = Field(
        0.7, gt=0, le=1, description="The share of a replica's time the expected calls fill."
    )
    short_window_s: float = Field(
        2.0, gt=0, le=120, description="Arrival-rate window that follows a step up."
    )
    long_window_s: float = Field(
        30.0, gt=0, le=120, description="Arrival-rate window that holds capacity after a spike."
    )

    reactive_delay_s: float = Field(
        30.0,
        ge=0,
        le=600,
        description="How long the callers' queue must ask for more replicas than the "
        "prediction before it is obeyed (Serve's own upscale delay): calls from outside "
        "the pipelines, or a service time set too low.",
    )

    spare_replicas: int = Field(
        0,
        ge=0,
        le=1000,
        description="Replicas kept running beyond what the arrivals need, while the "
        "server's pipelines send anything: a warm reserve that answers a step up while "
        "the new replicas start. Worth its cost where a replica's start is long against "
        "the callers' deadline (an LLM).",
    )

    @model_validator(mode="after")
    def _windows(self) -> GraphScaling:
        if self.long_window_s < self.short_window_s:
            raise ValueError(
                f"long_window_s ({self.long_window_s:g}) is shorter than short_window_s "
                f"({self.short_window_s:g}); make it at least as long"
            )
        return self


class Bounds(BaseModel):
    """The Serve autoscaling options the graph-aware policy is given with."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(ge=0, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    target_ongoing_requests: float = Field(gt=0)
    # Scale-up at once; scale-in after arrivals stayed low this long, by half the
    # difference each time (Serve's `downscaling_factor`): gradual, never flapping.
    upscale_delay_s: float = Field(0.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    downscaling_factor: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> Bounds:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is under min_replicas "
                f"({self.min_replicas}); raise max_replicas or lower min_replicas"
            )
        return self


def graph_autoscaling(
    server: str,
    *,
    service_time_s: float,
    min_replicas: int,
    max_replicas: int,
    target_ongoing_requests: float,
    **options: Any,
) -> dict[str, Any]:
    """A Serve `autoscaling_config` that scales `server` by the pipelines' arrivals
    (`GraphAwarePolicy`), its options checked here (pydantic's ValidationError names
    the field). `options`: `GraphScaling`'s and `Bounds`' other fields."""
    policy_fields = {k: v for k, v in options.items() if k in GraphScaling.model_fields}
    bound_fields = {k: v for k, v in options.items() if k not in policy_fields}
    policy = GraphScaling(server=server, service_time_s=service_time_s, **policy_fields)
    bounds = Bounds(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests,
        **bound_fields,
    )
    _check_reserve(policy, bounds.max_replicas)
    return {
        **bounds.model_dump(),
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": policy.model_dump()},
    }


def check_graph_autoscaling(config: Any) -> None:
    """Refuse a Serve `autoscaling_config` whose graph-aware policy options are out of
    range, naming the field (pydantic's ValidationError, or a ValueError for a reserve
    that leaves no replica for the load); nothing for another policy. Server builders
    call it on the options they deploy: a config written by hand (a profile, a YAML
    override) is checked as `graph_autoscaling`'s is."""
    if not isinstance(config, dict):  # none, or Serve's own AutoscalingConfig object
        return
    policy = config.get("policy") or {}
    if not isinstance(policy, dict) or policy.get("policy_function") != POLICY_PATH:
        return
    options = GraphScaling(**(policy.get("policy_kwargs") or {}))
    _check_reserve(options, int(config.get("max_replicas", 1)))  # Serve's default


def _check_reserve(options: GraphScaling, max_replicas: int) -> None:
    if options.spare_replicas and options.spare_replicas >= max_replicas:
        raise ValueError(
            f"spare_replicas ({options.spare_replicas}) leaves no replica of max_replicas "
            f"({max_replicas}) for the load; lower spare_replicas or raise max_replicas"
        )
