"""The graph-aware autoscaling policy: the class Serve's controller instantiates once
per model server (`autoscaling_config.policy`, Ray's custom-policy hook) and calls
every control-loop tick (0.25 s here, `servegraph.deploy.local_ray.RAY_AT_REST_ENV`).

Each call reads the server's expected load from the demand board's latest snapshot,
which a thread in the controller refreshes (`servegraph.deploy.scaling.watch`): the control
loop never waits on an actor call, and every server's policy reads the same snapshot,
so a rise in
`rag` arrivals grows the embedder, the index and the LLM in the same tick. Serve's own
wrapper then applies the bounds (`min_replicas`, `max_replicas`) and the delays
(`upscale_delay_s`, `downscale_delay_s`, `downscaling_factor`): those are not redone
here. Without a board (no ingress has reported yet) the policy is Serve's default rule
alone: the callers' queue over `target_ongoing_requests`, after its delay.
"""

from __future__ import annotations

import math
import time
from typing import Any

from servegraph.deploy.scaling.demand import Load, replicas_wanted
from servegraph.deploy.scaling.settings import GraphScaling
from servegraph.deploy.scaling.watch import shared


class GraphAwarePolicy:
    """Serve's custom autoscaling policy for one model server; its keyword arguments
    are `servegraph.deploy.scaling.settings.GraphScaling`'s fields (`policy_kwargs`)."""

    def __init__(self, **options: Any) -> None:
        self.options = GraphScaling(**options)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """`ctx`: Serve's `AutoscalingContext`. Returns the replicas wanted (Serve
        rounds up and bounds them) and the policy's state (shown by the dashboard).

        The prediction is obeyed at once. The callers' queue (Serve's own rule) is
        obeyed only once it has asked for more than the prediction for
        `reactive_delay_s`, as Serve's default policy waits its upscale delay: a
        passing queue never adds a replica, a lasting one (a server's own REST
        callers, whom no pipeline predicts) does."""
        o = self.options
        now = float(ctx.current_time or time.time())
        load = shared().load(o.server, o.short_window_s, o.long_window_s)
        predicted = replicas_wanted(
            load, service_time_s=o.service_time_s, target_utilisation=o.target_utilisation
        )
        # The warm reserve, ready for a step while new replicas start: only while the
        # pipelines call (an idle server keeps its minimum, zero if it may), and on top
        # of a lasting queue too.
        spare = o.spare_replicas if predicted > 0 else 0
        queue = replicas_wanted(
            Load(),
            service_time_s=o.service_time_s,
            target_utilisation=o.target_utilisation,
            ongoing=float(ctx.total_num_requests or 0.0),
            target_ongoing=ctx.config.target_ongoing_requests,
        )
        since = ctx.policy_state.get("queue_above_since")
        if math.ceil(queue) > max(math.ceil(predicted + spare), ctx.current_num_replicas):
            since = now if since is None else since
        else:
            since = None
        lasting = since is not None and now - since >= o.reactive_delay_s
        if lasting:
            wanted = max(predicted, queue) + spare
        else:
            # A queue too short-lived to add replicas still keeps those it uses: the
            # prediction falling never takes away replicas busy with calls (Serve's
            # `downscale_delay_s` then paces what does go).
            wanted = max(predicted + spare, min(queue, ctx.current_num_replicas))
        state = {
            "calls_per_s_short": load.short,
            "calls_per_s_long": load.long,
            "predicted": predicted,
            "spare": spare,
            "queue": queue,
            "queue_above_since": since,
        }
        return wanted, state
